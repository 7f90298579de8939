"""``vlmoe pretrain``: masked multimodal pretraining through LightningCLI.

    vlmoe pretrain                                   # the demo: demo X-MoE, demo data, ~5 min on CPU
    vlmoe pretrain --config configs/pretrain/beit3_base.yaml --config configs/pretrain/moe/mhmoe8.yaml
    vlmoe pretrain --trainer.max_steps 100 --model.model tiny_moe   # overrides win over files
    vlmoe pretrain --config run.yaml --ckpt_path last               # resume (optimizer, schedule, step)
    vlmoe pretrain --run_dir runs/exp1 --model.model tiny_moe         # logs + checkpoints in runs/exp1
    vlmoe pretrain --print_config > my_run.yaml                      # every option with its value

Without a subcommand ``fit`` is implied (``validate`` also works). The defaults of every option
*are* the demo run, so it needs no file from the source tree. See :class:`vlmoe.tasks.cli.VLMoECLI`
for what every training command shares (run folder, checkpoints, resume checks).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from ..base import NonFiniteLossError
from ..cli import VLMoECLI, default_callbacks, default_loggers, recipe_yaml, run_cli
from .data import PretrainDataModule
from .task import PretrainTask

__all__ = ["DEFAULT_RUN_DIR", "DEMO_DEFAULTS", "PretrainCLI", "build_cli", "demo_yaml", "main", "trainer_defaults"]

DEFAULT_RUN_DIR = "runs/pretrain/demo"
DESCRIPTION = (
    "Masked multimodal pretraining (MLM + MIM on pairs, images, texts). No arguments: the CPU demo "
    "(demo X-MoE, demo data). Subcommands fit (implied) | validate; --debug shows tracebacks."
)


# The demo's values of the task and data options whose library defaults differ (the library defaults
# are BEiT-3's); with trainer_defaults() this is the whole demo run (configs/pretrain/demo.yaml is
# written from them by tools/write_configs.py).
DEMO_DEFAULTS: dict[str, Any] = {
    "model.model": "demo_xmoe",
    # the captions name the shape's colour, size and side: the MIM target keeps each patch's colour
    # (a per-patch normalised target is all zeros on flat patches and the same for every colour), and
    # no crop or flip moves the shape away from the side and size its caption states
    "model.mim_target": {"class_path": "vlmoe.tasks.pretrain.PixelTarget", "init_args": {"norm_per_patch": False}},
    "model.min_lr": 1.0e-5,
    "model.warmup_steps": 50,
    "data.max_len": 40,
    "data.scale": (1.0, 1.0),
    "data.hflip": 0.0,
    # a pair's image is seen whole: block masking hides the one shape a caption's colour and shape
    # words name, and with it masked language modeling on pairs never needs the image (the masked
    # colour word: 19 % right with 40 % of the pair's patches masked, 82 % with none; chance 12.5 %)
    "data.mim_ratio_pair": 0.0,
    "data.num_workers": 1,
}


def trainer_defaults() -> dict[str, Any]:
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


class PretrainCLI(VLMoECLI):
    """``vlmoe pretrain``: the tokenizer sizes the text embedding; MIM targets undo the data's normalisation."""

    command = "pretrain"
    default_run_dir = DEFAULT_RUN_DIR

    def link_arguments(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(DEMO_DEFAULTS)
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.mean_std", "model.mean_std", apply_on="parse")


DEMO_NOTES = """\
  vlmoe pretrain --config configs/pretrain/demo.yaml

The demo X-MoE model (2 blocks of width 64, 8 heads, X-MoE in both: 4 experts per modality, top-2),
easy-vqa demo shards built on first use into $VLMOE_DATA/demo or ~/.cache/vlmoe/demo, 48 samples a
step (16 pairs + 16 images + 16 texts), pixel MIM targets that keep colours, the pairs' images seen
whole (MIM on the image stream only), no crop or flip, CPU, fp32."""


def demo_yaml() -> str:
    """The text of ``configs/pretrain/demo.yaml``: the demo run as the CLI's defaults state it
    (:data:`DEMO_DEFAULTS`, :func:`trainer_defaults`, the run folder's loggers and checkpoints), written
    by ``tools/write_configs.py``."""
    header = ("The demo run, spelled out: `vlmoe pretrain` with no arguments runs exactly this.\n"
              "Written from vlmoe/tasks/pretrain/cli.py (DEMO_DEFAULTS, trainer_defaults)\n"
              "by `python tools/write_configs.py`: edit those, not this file.\n\n" + DEMO_NOTES)
    trainer = {**trainer_defaults(), "logger": default_loggers(DEFAULT_RUN_DIR), "callbacks": default_callbacks()}
    return recipe_yaml(header, {
        "seed_everything": 0,
        "trainer": trainer,
        **DEMO_DEFAULTS,
        "checkpoint": {"dirpath": f"{DEFAULT_RUN_DIR}/checkpoints", "every_n_train_steps": 200},
    })


def build_cli(args: list[str] | None, run: bool = True, cli_class: type[PretrainCLI] = PretrainCLI) -> PretrainCLI:
    """The ``vlmoe pretrain`` CLI object (``run=False``: parse and instantiate only, as the config tests do)."""
    return run_cli(
        cli_class, PretrainTask, PretrainDataModule, args, run=run, trainer_defaults=trainer_defaults(),
        description=DESCRIPTION,
    )


def main(argv: list[str] | None = None) -> PretrainCLI:
    """``vlmoe pretrain [fit|validate] [options]``; ``fit`` when no subcommand is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return build_cli(argv)
    except NonFiniteLossError as e:
        raise SystemExit(f"vlmoe pretrain: {e}") from None


if __name__ == "__main__":
    main()
