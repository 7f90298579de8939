"""``vlmoe finetune TASK``: finetuning and evaluation through LightningCLI.

    vlmoe finetune vqav2                                   # the demo: the demo pretraining checkpoint, CPU
    vlmoe finetune vqav2 --config configs/finetune/vqav2/beit3_base.yaml --config configs/trainer/ddp.yaml
    vlmoe finetune vqav2 validate --ckpt_path runs/finetune/vqav2/demo/checkpoints/last.ckpt   # score it
    vlmoe finetune vqav2 test --ckpt_path ... --data.test_questions ...   # EvalAI results file
    vlmoe finetune nlvr2 | imagenet ...

TASK is a registered task (:mod:`vlmoe.tasks.registry`: the built-in ones and any a user's module
registers); without a subcommand ``fit`` is implied. The defaults of every option
are the task's demo (``configs/finetune/<task>/demo.yaml`` spells it out). Metrics land in the logs
(``val/accuracy``, ...) and, with the predictions, in ``<run_dir>/predictions/``; the best checkpoint
by the task's metric is kept next to ``last.ckpt``.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser

from ..cli import SUBCOMMANDS, VLMoECLI, recipe_yaml, run_cli
from ..registry import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "FinetuneCLI", "build_cli", "demo_yaml", "main"]


# the trainer defaults of every task (a task's spec adds its own: epochs or steps)
_TRAINER = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "gradient_clip_val": None,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
}


class FinetuneCLI(VLMoECLI):
    """``vlmoe finetune TASK``: the task's links, the best checkpoint by its metric, predictions folder."""

    spec: TaskSpec

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults(
            {
                # map-style splits: a checkpoint after each validation, the best by the task's metric
                "checkpoint.every_n_train_steps": None,
                "checkpoint.monitor": f"val/{self.spec.metric}",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,  # metric names hold '/' (folders)
                "checkpoint.filename": "step={step:06d}-" + self.spec.metric + "={val/" + self.spec.metric + ":.4f}",
            }
        )

    def link_arguments(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(self.spec.demo)
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        for source, target in self.spec.links:
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        cfg = self._cfg()
        if cfg.model.get("output_dir") is None:
            cfg.model.output_dir = f"{cfg.checkpoint.dirpath.rstrip('/').rsplit('/', 1)[0]}/predictions"


def _cli_class(name: str) -> type[FinetuneCLI]:
    spec = get_task(name)
    return type(f"Finetune{name.capitalize()}CLI", (FinetuneCLI,), {
        "spec": spec, "command": f"finetune {name}", "default_run_dir": f"runs/finetune/{name}/demo",
    })


def build_cli(task: str, args: list[str] | None, run: bool = True, cli_class: type | None = None) -> FinetuneCLI:
    """The CLI of ``vlmoe finetune TASK`` (``run=False``: parse and instantiate only)."""
    spec = get_task(task)
    cls = cli_class or _cli_class(task)
    return run_cli(cls, spec.task, spec.data, args, run=run, trainer_defaults={**_TRAINER, **spec.trainer},
                   description=spec.description + " No options: the CPU demo. Subcommands fit (implied) | validate | "
                   "test | predict; --debug shows tracebacks.")


def demo_yaml(name: str) -> str:
    """The text of ``configs/finetune/<name>/demo.yaml``: the task's demo as its spec states it (the CLI's
    defaults), written by ``tools/write_configs.py``; the spec is the one source."""
    spec = get_task(name)
    module = spec.task.__module__.replace(".", "/") + ".py"
    header = (f"The {name} demo, spelled out: `vlmoe finetune {name}` with no options runs exactly this.\n"
              f"Written from its TaskSpec ({module})\nby `python tools/write_configs.py`: edit the spec, "
              f"not this file.\n\n{spec.demo_notes}")
    return recipe_yaml(header, {
        "seed_everything": 0,
        "trainer": {**_TRAINER, **spec.trainer},
        **spec.demo,
        "checkpoint": {"dirpath": f"runs/finetune/{name}/demo/checkpoints", "monitor": f"val/{spec.metric}",
                       "mode": "max"},
    })


def _usage() -> str:
    width = max(len(n) for n in TASKS) + 1
    return "usage: vlmoe finetune TASK [fit|validate|test|predict] [options]\n\ntasks:\n" + "\n".join(
        f"  {n:<{width}} {s.description}" for n, s in TASKS.items()
    )


def main(argv: list[str] | None = None) -> FinetuneCLI | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return None
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        raise ValueError(f"unknown finetuning task {task!r}; choose from {sorted(TASKS)} (vlmoe finetune --help)")
    if rest and rest[0] in SUBCOMMANDS and rest[0] != "fit" and not any(a.startswith("--ckpt_path") for a in rest):
        print(f"vlmoe finetune {task} {rest[0]}: scoring the model of --model.init_checkpoint (no --ckpt_path given)",
              file=sys.stderr)
    return build_cli(task, rest)


if __name__ == "__main__":
    main()
