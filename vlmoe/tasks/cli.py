"""The LightningCLI base of vlmoe's training commands (``vlmoe pretrain``, ``vlmoe finetune TASK``).

What every command gets from :class:`VLMoECLI`:

- ``fit`` implied when no subcommand is given, ``--help`` showing the training options;
- ``--run_dir DIR``: every logger's ``save_dir`` and the checkpoint folder under one directory,
  checked to be writable before anything is built;
- the checkpoint callback always on (``--checkpoint.*``, see
  :class:`~vlmoe.tasks.callbacks.VLMoECheckpoint`), atomic checkpoint writes, stale temporaries of a
  killed write removed on start;
- ``--ckpt_path last`` resolved to the run's ``last.ckpt`` (an error naming the folder when there is
  none), and a resumed checkpoint's hyperparameters compared with this run's: the values on the
  command line and in ``--config`` files apply (as ``--print_config`` shows) and every option that
  differs from the checkpoint's is named with both values; a checkpoint of another architecture is
  refused by the task before any weight is touched;
- ``--config`` files checked for YAML syntax first, so an error names the file;
- Lightning's messages that do not apply to vlmoe runs silenced (see :func:`quiet_lightning`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer import Trainer

from vlmoe.io import remove_stale_temporaries, torch_load

from .callbacks import AtomicCheckpointIO, VLMoECheckpoint

__all__ = ["SUBCOMMANDS", "VLMoECLI", "default_callbacks", "default_loggers", "quiet_lightning", "run_cli"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def recipe_yaml(header: str, sections: dict[str, Any]) -> str:
    """A recipe file: ``header`` as ``#`` comment lines, then ``sections`` (``{"trainer": {...}, "model":
    {...}}``, or dotted keys ``{"model.lr": 1e-3}`` grouped into their sections) as YAML."""
    import yaml

    nested: dict[str, Any] = {}
    for key, value in sections.items():
        section, _, option = key.partition(".")
        if option:
            nested.setdefault(section, {})[option] = _plain(value)
        else:
            nested[section] = _plain(value)
    class Dumper(yaml.SafeDumper):  # mappings as blocks, lists (of scalars) on one line
        pass

    def flow_list(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
        flow = all(not isinstance(v, dict | list) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, flow_list)
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip("\n").splitlines())
    return comment + yaml.dump(nested, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=110)


def default_loggers(run_dir: str) -> list[dict[str, Any]]:
    """CSV (no dependencies, easy to read back) and TensorBoard logs under ``run_dir``."""
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": run_dir, "name": "logs"}},
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": run_dir, "name": "tb", "default_hp_metric": False},
        },
    ]


def default_callbacks() -> list[dict[str, Any]]:
    """The step progress bar and the learning-rate monitor."""
    return [
        {"class_path": "vlmoe.tasks.callbacks.StepProgressBar"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    ]


class _DropLines(logging.Filter):
    """Drop Lightning info lines that say nothing about a vlmoe run."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("💡 Tip"):  # an advert for a hosted logger
            return False
        if "Skipping setting a default `ModelSummary`" in msg:  # vlmoe's summary is the one wanted
            return False
        # "GPU available: False, used: False", "TPU available: False, ...": only when absent
        return not (" available: False" in msg and msg.split(" available:")[0] in ("GPU", "TPU", "HPU", "IPU"))


def quiet_lightning() -> None:
    """Silence Lightning output that does not apply to vlmoe runs (idempotent).

    - the hosted-logger tip and the "GPU/TPU available: False" lines;
    - the ``IterableDataset`` ``__len__`` warning: vlmoe's streams split shards per worker and fix
      each worker's length, which is what the warning asks for;
    - the "dataloader is not resumable" warning: vlmoe's data modules handle mid-epoch resume
      themselves (``data.resume``);
    - the pytree ``LeafSpec`` deprecation notice of Lightning's own internals.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in lg.filters):
            lg.addFilter(_DropLines())
    warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r".*dataloader is not resumable")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _is_rank_zero() -> bool:
    return all(int(os.environ.get(v, 0) or 0) == 0 for v in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _plain(value: Any) -> Any:
    """Config values (Namespaces, tuples) as plain data, for comparing with checkpoint hyperparameters."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class VLMoECLI(LightningCLI):
    """LightningCLI with the vlmoe run conventions (see the module docstring).

    Subclasses set :attr:`command` (``"pretrain"``, ``"finetune vqav2"``, ...) and
    :attr:`default_run_dir`, and may override :meth:`link_arguments`.
    """

    command = "train"
    default_run_dir = "runs/train"

    # ------------------------------------------------------------------ parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(VLMoECheckpoint, "checkpoint")
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Put logs and checkpoints here (sets every logger's save_dir and checkpoint.dirpath).",
        )
        parser.set_defaults(
            {
                "checkpoint.dirpath": f"{self.default_run_dir}/checkpoints",
                "checkpoint.every_n_train_steps": 200,
                # as parser defaults (not trainer_defaults) so a config file can replace them
                "trainer.logger": default_loggers(self.default_run_dir),
                "trainer.callbacks": default_callbacks(),
            }
        )
        self.link_arguments(parser)

    def link_arguments(self, parser: LightningArgumentParser) -> None:
        """Data -> model links of the command's task (none by default)."""

    def _parse_ckpt_path(self) -> None:
        # Lightning's version replaces the parsed model options with the checkpoint's hyperparameters
        # (so --model.* flags were silently ignored on resume while --print_config showed them);
        # before_instantiate_classes compares them instead.
        return

    # ------------------------------------------------------------------ before instantiation
    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        run_dir = cfg.get("run_dir")
        if run_dir:
            loggers = cfg.trainer.logger
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                init = getattr(logger, "init_args", None)
                if init is not None and "save_dir" in init:
                    init.save_dir = run_dir
            cfg.checkpoint.dirpath = f"{run_dir.rstrip('/')}/checkpoints"
        if self.subcommand in (None, "fit"):
            self._check_writable(run_dir or str(Path(cfg.checkpoint.dirpath).parent))
            if _is_rank_zero():
                remove_stale_temporaries(cfg.checkpoint.dirpath)
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            cfg.ckpt_path = ckpt = str(self._find_last(cfg.checkpoint.dirpath, run_dir))
        if ckpt and ckpt not in ("best", "hpc"):
            self._compare_hparams(ckpt, cfg)

    def _check_writable(self, folder: str) -> None:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".vlmoe-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"--run_dir {folder}: cannot write there ({e.strerror or e})") from None

    @staticmethod
    def _find_last(dirpath: str, run_dir: str | None) -> Path:
        folder = Path(dirpath)
        found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if not found:
            where = f" (the checkpoint folder of --run_dir {run_dir})" if run_dir else ""
            raise FileNotFoundError(
                f"--ckpt_path last: no last*.ckpt in {folder.resolve()}{where}; check --run_dir / "
                "--checkpoint.dirpath, or leave out --ckpt_path to start a new run"
            )
        return found[-1]

    def _compare_hparams(self, ckpt_path: str, cfg: Any) -> None:
        """Name every model option whose value differs from the checkpoint's (this run's value applies)."""
        ckpt = torch_load(ckpt_path)
        hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not isinstance(hparams, dict) or cfg.get("model") is None:
            return
        ours = _plain(cfg.model)
        if isinstance(ours, dict) and "init_args" in ours:  # subclass mode: class_path + init_args
            ours = ours["init_args"]
        diffs = []
        for key, theirs in sorted(_plain(hparams).items()):
            if key in ours and ours[key] != theirs:
                diffs.append(f"model.{key}: {ours[key]!r} (checkpoint: {theirs!r})")
        if diffs and _is_rank_zero():
            print(
                f"vlmoe {self.command}: resuming {ckpt_path} with options that differ from the ones it was "
                "trained with; this run's values apply:\n  " + "\n  ".join(diffs),
                file=sys.stderr,
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, OSError, KeyError) as e:
            # jsonargparse reports a failed class as "Does not validate against any of the Union
            # subtypes ..." over many lines; the exception the class raised is at the end of the chain
            root: BaseException = e
            while (nxt := root.__cause__ or (None if root.__suppress_context__ else root.__context__)) is not None:
                root = nxt
            if root is e or not isinstance(root, ValueError | OSError | KeyError):
                raise
            raise root from None

    # ------------------------------------------------------------------ trainer
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        from lightning.pytorch.callbacks import ModelSummary as LightningSummary

        from .callbacks import ModelSummary, SkippedSamples

        if config.get("enable_progress_bar") is False:
            # the default callbacks carry a progress bar; Lightning refuses one when asked for none
            from lightning.pytorch.callbacks.progress import ProgressBar

            config["callbacks"] = [c for c in (config.get("callbacks") or []) if not isinstance(c, ProgressBar)]
        given = list(config.get("callbacks") or []) + list(callbacks)
        extra = []
        if config.get("enable_model_summary") is not False and not any(isinstance(c, LightningSummary) for c in given):
            extra.append(ModelSummary())  # parameters by part, experts; no "FLOPs 0" column
        if not any(isinstance(c, SkippedSamples) for c in given):
            extra.append(SkippedSamples())
        return super()._instantiate_trainer(config, [*callbacks, *extra])


def _check_config_files(argv: Sequence[str]) -> None:
    """YAML syntax errors of ``--config FILE`` arguments, named by file (jsonargparse names none)."""
    import yaml

    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"--config {f}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"--config {f}: not valid YAML{where}: {problem}") from None


def run_cli(
    cli_class: type[VLMoECLI],
    model_class: type,
    datamodule_class: type,
    args: Sequence[str] | None,
    *,
    run: bool = True,
    trainer_defaults: dict[str, Any] | None = None,
    description: str = "",
) -> VLMoECLI:
    """Build (and with ``run``, run) a command's CLI.

    Args:
        cli_class: the command's :class:`VLMoECLI` subclass.
        model_class: the LightningModule class.
        datamodule_class: the LightningDataModule class.
        args: command-line arguments after the command name; ``fit`` is implied when they start with
            no subcommand, and a bare ``--help`` shows ``fit``'s options. With ``run=False`` (parse
            and instantiate only, as the config tests do) a leading subcommand is dropped.
        run: run the subcommand.
        trainer_defaults: Trainer defaults of the command.
        description: the command's help text.
    """
    args = list(args or [])
    if run and (not args or args[0] not in SUBCOMMANDS):
        args = ["fit", *args]
    if not run and args and args[0] in SUBCOMMANDS:
        args = args[1:]
    _check_config_files(args)
    quiet_lightning()
    with warnings.catch_warnings():
        # the `vlmoe` entry point hands LightningCLI its own argv; Lightning warns when it sees both
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_class(
            model_class,
            datamodule_class,
            trainer_defaults=trainer_defaults or {},
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            # optimizer and schedule come from the task (layer decay needs the model's layer ids)
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": f"vlmoe {cli_class.command}",
                "description": description,
                **({} if run else {"exit_on_error": False}),
            },
            args=args,
            run=run,
        )
