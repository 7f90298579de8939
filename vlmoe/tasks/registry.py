"""The task registry: each finetuning task is one module that registers one :class:`TaskSpec`.

    from vlmoe.tasks.registry import TaskSpec, Prediction, Input, register_task
    register_task(TaskSpec(name="count", task=CountTask, data=CountDataModule, model=CountModel,
                           metric="accuracy", predict=Prediction("count", count_shapes)))

A spec names everything the rest of the package needs to know of a task: its LightningModule and
DataModule (the task's evaluator is the module's ``make_evaluator``), its task model (the
:class:`~vlmoe.models.TaskModel` subclass whose ``task`` an export records), the metric the best
checkpoint is chosen by, the demo recipe and trainer settings of ``vlmoe finetune NAME``, how the model
is used on one's own images (:class:`Prediction`: the :class:`~vlmoe.inference.Predictor` method,
the inputs of ``vlmoe predict`` and of the web page, the JSON line and the page text of a result), and
the study's budget. ``vlmoe finetune``, ``vlmoe predict``, ``vlmoe app``, ``vlmoe study`` and
``vlmoe.load`` read the registry; none of them switches on task names.

The built-in tasks register when :mod:`vlmoe.tasks.finetune` is imported (:func:`tasks` does it); a
task defined elsewhere registers when its module is imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Input", "Prediction", "TaskSpec", "get_task", "register_task", "task_for_model", "tasks", "unregister_task"]


@dataclass(frozen=True)
class Input:
    """One input of a prediction besides the image(s): a keyword of the prediction function, an option
    of ``vlmoe predict`` (``--name``, dashes for underscores) and, with ``page``, a field of the web page.

    Args:
        name: the keyword argument.
        kind: ``text`` (one string), ``texts`` (strings: repeated option, one per line on the page),
            ``image`` (a second image: a path for ``vlmoe predict``), ``int`` or ``float``.
        help: one line for ``--help`` and the page label.
        default: used when the input is not given (``vlmoe predict`` and the page).
        required: ``vlmoe predict`` and the page refuse to run without it (``missing``: the message).
        page: shown on the web page (else the page passes ``Prediction.page_kwargs`` or the default).
        minimum / maximum: the range of a number (a slider on the page when both are given).
        missing: the error when a required input is missing or blank.
        flag: the ``vlmoe predict`` option when it is not ``--name`` (``--question`` for ``questions``).
    """

    name: str
    kind: str
    help: str
    default: Any = None
    required: bool = False
    page: bool = True
    minimum: float | None = None
    maximum: float | None = None
    missing: str = ""
    flag: str = ""

    KINDS = ("text", "texts", "image", "int", "float")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"Input {self.name!r}: kind must be one of {self.KINDS}, got {self.kind!r}")

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` with a blank text or list taken as missing; a missing required input or a number out
        of range is a ValueError (naming the input as ``name``, default its keyword)."""
        if isinstance(value, str):
            value = value.strip()
        if isinstance(value, list | tuple):
            value = [v.strip() if isinstance(v, str) else v for v in value]
            value = [v for v in value if v not in ("", None)]
        if value in (None, "", []):
            if self.required:
                raise ValueError(self.missing or f"give the {self.help}")
            return self.default
        if self.kind in ("int", "float"):
            value = int(value) if self.kind == "int" else float(value)
            low, high = self.minimum, self.maximum
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = [f">= {low}"] * (low is not None) + [f"<= {high}"] * (high is not None)
                raise ValueError(f"{name or self.name} must be {' and '.join(bounds)}, got {value}")
        return value


def _json_row(result: Any) -> dict[str, Any]:
    """A per-image result as the fields of a ``vlmoe predict`` JSON line: a list -> ``predictions``, a dict
    -> its items, anything else -> ``result``."""
    if isinstance(result, list):
        return {"predictions": result}
    if isinstance(result, dict):
        return result
    return {"result": result}


def _text(result: Any) -> str:
    """A per-image result as page text: a string as it is, else one JSON value per line."""
    if isinstance(result, str):
        return result
    if isinstance(result, list):
        return "\n".join(json.dumps(r) for r in result)
    return json.dumps(result)


@dataclass(frozen=True)
class Prediction:
    """How a task model is used on one's own images.

    Args:
        method: the :class:`~vlmoe.inference.Predictor` method and the ``vlmoe predict`` command.
        fn: ``fn(predictor, images, **inputs) -> one result per image``; the predictor gives the model,
            its preprocessing (``predictor.images``, ``predictor.texts``), batching (``predictor.batches``)
            and device.
        inputs: the inputs besides the images.
        help: one line for ``vlmoe predict --help``.
        more: further ``Predictor`` methods of the task (name -> ``fn(predictor, *args, **kw)``).
        row: a result -> the fields of its ``vlmoe predict`` JSON line (default: a list as ``predictions``,
            a dict as its items).
        cli_kwargs: fixed keywords ``vlmoe predict`` passes (e.g. no masks in JSON lines).
        text: a result -> the answer text on the web page.
        page_kwargs: fixed keywords the page passes (e.g. the top 5 answers).
        page: replaces the page's whole response: ``page(predictor, image, **inputs) -> (text, drawn image
            or None)`` (detection: the boxes drawn on the upload).
        draws: the page shows the drawn image.
    """

    method: str
    fn: Callable[..., list[Any]]
    inputs: tuple[Input, ...] = ()
    help: str = ""
    more: dict[str, Callable[..., Any]] = field(default_factory=dict)
    row: Callable[[Any], dict[str, Any]] = _json_row
    cli_kwargs: dict[str, Any] = field(default_factory=dict)
    text: Callable[[Any], str] = _text
    page_kwargs: dict[str, Any] = field(default_factory=dict)
    page: Callable[..., tuple[str, Any]] | None = None
    draws: bool = False

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {self.method: self.fn, **self.more}

    def respond(self, predictor: Any, image: Any, values: dict[str, Any]) -> tuple[str, Any]:
        """The web page's ``(text, drawn image or None)`` for one image and the page's input values."""
        kwargs = {i.name: i.check(values.get(i.name)) for i in self.inputs if i.page}
        kwargs.update(self.page_kwargs)
        with torch.inference_mode():
            if self.page is not None:
                return self.page(predictor, image, **kwargs)
            return self.text(self.fn(predictor, image, **kwargs)[0]), None


@dataclass(frozen=True)
class TaskSpec:
    """A finetuning task (see the module docstring).

    Args:
        name: the one name of the task (``vlmoe finetune NAME``, ``runs/finetune/NAME``).
        task / data: its LightningModule and LightningDataModule classes.
        model: its task model class (:class:`~vlmoe.models.TaskModel`; ``model.task`` is what an export
            records).
        metric: the validation metric the best checkpoint is chosen by (``val/<metric>``).
        links: data -> model arguments the CLI links (``("data.answers", "model.answers")``).
        demo: the CLI defaults: the task's demo recipe (``configs/finetune/NAME/demo.yaml`` is written from it
            by ``tools/write_configs.py``).
        trainer: the trainer defaults of the demo.
        demo_notes: what the demo does and why, the head comment of its YAML file.
        description: one line for ``vlmoe finetune --help``.
        predict: how the model is used on one's own images (None: it is not).
        routing_groups: ``vlmoe analyze routing``'s default grouping (``class`` or ``answer_type``).
        study_metrics: the metric keys ``vlmoe study`` keeps (its headline is ``metric``).
        study_budgets: the study's extra CLI options per budget (``demo``, ``smoke``).
    """

    name: str
    task: type
    data: type
    model: type
    metric: str
    links: tuple[tuple[str, str], ...] = ()
    demo: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    demo_notes: str = ""
    predict: Prediction | None = None
    routing_groups: str = "class"
    study_metrics: tuple[str, ...] = ()
    study_budgets: dict[str, list[str]] = field(default_factory=dict)

    @property
    def model_task(self) -> str:
        """The task name an export of this task's model records (``model.task``)."""
        return self.model.task


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the registry (and its task model to :data:`vlmoe.models.TASK_MODELS`, so exports of
    it load). A name or a prediction method already taken by another task is an error."""
    from vlmoe.models.task_models import TASK_MODELS

    old = TASKS.get(spec.name)
    if old is not None and old.task is not spec.task:
        raise ValueError(f"a task named {spec.name!r} is already registered ({old.task.__name__})")
    if spec.predict is not None:
        for other in TASKS.values():
            if other.name != spec.name and other.predict is not None:
                taken = set(other.predict.methods()) & set(spec.predict.methods())
                if taken:
                    raise ValueError(f"task {spec.name!r}: prediction method(s) {sorted(taken)} already belong to "
                                     f"task {other.name!r}")
    known = TASK_MODELS.get(spec.model_task)
    if known is not None and known is not spec.model:
        raise ValueError(f"task {spec.name!r}: model task {spec.model_task!r} is already {known.__name__}")
    TASK_MODELS[spec.model_task] = spec.model
    TASKS[spec.name] = spec
    return spec


def unregister_task(name: str) -> TaskSpec:
    """Remove the task registered as ``name`` (and its task model); returns its spec."""
    from vlmoe.models.task_models import TASK_MODELS

    spec = TASKS.pop(name)
    if TASK_MODELS.get(spec.model_task) is spec.model:
        del TASK_MODELS[spec.model_task]
    return spec


def tasks() -> dict[str, TaskSpec]:
    """Every registered task by name (the built-in ones first)."""
    import vlmoe.tasks.finetune  # noqa: F401  (the built-in tasks register on import)

    return TASKS


def get_task(name: str) -> TaskSpec:
    """The task registered as ``name``; an unknown name is an error listing the known ones."""
    specs = tasks()
    if name not in specs:
        raise ValueError(f"unknown finetuning task {name!r}; choose from {sorted(specs)}")
    return specs[name]


def task_for_model(model_task: str) -> TaskSpec | None:
    """The task whose model records ``model_task`` (``vqa`` -> the ``vqav2`` task); None for none."""
    return next((s for s in tasks().values() if s.model_task == model_task), None)
