"""``vlmoe pretrain``: masked multimodal pretraining through LightningCLI.

    vlmoe pretrain                                   # the demo: tiny MH-MoE, demo data, ~5 min on CPU
    vlmoe pretrain --config configs/pretrain/beit3_base_mhmoe8.yaml --config configs/trainer/ddp.yaml
    vlmoe pretrain --trainer.max_steps 100 --model.model tiny_moe   # overrides win over files
    vlmoe pretrain --config run.yaml --ckpt_path last               # resume (optimizer, schedule, step)
    vlmoe pretrain --run_dir runs/exp1 --model.model tiny_moe         # logs + checkpoints in runs/exp1
    vlmoe pretrain --print_config > my_run.yaml                      # every option with its value

Without a subcommand ``fit`` is implied (``validate`` also works). The defaults of every option
*are* the demo run, so it needs no file from the source tree. Always present: the checkpoint
callback (``--checkpoint.dirpath``, ``--checkpoint.every_n_train_steps``; see
:class:`~vlmoe.tasks.callbacks.PretrainCheckpoint`) and atomic checkpoint writes.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer import Trainer

from .base import NonFiniteLossError
from .callbacks import AtomicCheckpointIO, PretrainCheckpoint
from .datamodule import PretrainDataModule
from .pretrain import PretrainTask

__all__ = ["DEFAULT_RUN_DIR", "PretrainCLI", "main", "trainer_defaults"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_RUN_DIR = "runs/pretrain/demo"


def trainer_defaults(run_dir: str = DEFAULT_RUN_DIR) -> dict[str, Any]:
    """Trainer options of the demo run (the CLI's defaults; loggers and callbacks: the parser's)."""
    return {
        "accelerator": "auto",
        "devices": 1,
        "precision": "32-true",
        "max_steps": 600,
        "gradient_clip_val": 3.0,
        "log_every_n_steps": 10,
        # iterable data: validation by step count, a fixed number of batches
        "val_check_interval": 200,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 8,
        "num_sanity_val_steps": 0,
    }


def default_loggers(run_dir: str = DEFAULT_RUN_DIR) -> list[dict[str, Any]]:
    """CSV (no dependencies, easy to read back) and TensorBoard logs under ``run_dir``."""
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": run_dir, "name": "logs"}},
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": run_dir, "name": "tb", "default_hp_metric": False},
        },
    ]


def default_callbacks() -> list[dict[str, Any]]:
    """The rich progress bar and the learning-rate monitor."""
    return [
        {"class_path": "vlmoe.tasks.callbacks.StepProgressBar"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    ]


class PretrainCLI(LightningCLI):
    """LightningCLI with the checkpoint callback always on, the data -> model links, atomic writes."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PretrainCheckpoint, "checkpoint")
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Put logs and checkpoints here (sets every logger's save_dir and checkpoint.dirpath).",
        )
        parser.set_defaults(
            {
                "checkpoint.dirpath": f"{DEFAULT_RUN_DIR}/checkpoints",
                "checkpoint.every_n_train_steps": 200,
                # as parser defaults (not trainer_defaults) so a config file can replace them
                "trainer.logger": default_loggers(),
                "trainer.callbacks": default_callbacks(),
            }
        )
        # the model's embedding follows the tokenizer; MIM targets undo the data's normalisation
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.mean_std", "model.mean_std", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = cfg.get("run_dir")
        if not run_dir:
            return
        loggers = cfg.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            if init is not None and "save_dir" in init:
                init.save_dir = run_dir
        cfg.checkpoint.dirpath = f"{run_dir.rstrip('/')}/checkpoints"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str] | None, run: bool = True, cli_class: type[PretrainCLI] = PretrainCLI) -> PretrainCLI:
    """The CLI object.

    Args:
        args: command-line arguments, starting with the subcommand when ``run`` is True.
        run: False: parse and instantiate only (no subcommand; a leading ``fit`` is dropped), as the
            config tests do.
        cli_class: the CLI class (tests substitute a parse-only subclass).
    """
    args = list(args or [])
    if not run and args and args[0] in SUBCOMMANDS:
        args = args[1:]
    with warnings.catch_warnings():
        # the `vlmoe` entry point hands LightningCLI its own argv; Lightning warns when it sees both
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _build(args, run, cli_class)


def _build(args: list[str], run: bool, cli_class: type[PretrainCLI]) -> PretrainCLI:
    return cli_class(
        PretrainTask,
        PretrainDataModule,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # optimizer and schedule come from the task (layer decay needs the model's layer ids)
        auto_configure_optimizers=False,
        parser_kwargs={
            "prog": "vlmoe pretrain",
            "description": "Masked multimodal pretraining (MLM + MIM on pairs, images, texts). "
            "No arguments: the CPU demo (tiny MH-MoE, demo data). `fit` is implied.",
            **({} if run else {"exit_on_error": False}),
        },
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> PretrainCLI:
    """``vlmoe pretrain [fit|validate] [options]``; ``fit`` when no subcommand is given.

    Args:
        argv: command-line arguments after ``pretrain`` (default: ``sys.argv[2:]`` semantics of the
            ``vlmoe`` entry point).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["fit", *argv]
    try:
        return build_cli(argv)
    except NonFiniteLossError as e:
        raise SystemExit(f"vlmoe pretrain: {e}") from None


if __name__ == "__main__":
    main()
