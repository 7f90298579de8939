"""The single ``vlmoe`` entry point.

Each subcommand lives in its own module and is imported only when used, so ``vlmoe --help`` is fast
and a command never pays for another's dependencies. A subcommand module exposes
``main(argv: list[str]) -> Any``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("vlmoe.bench.cli", "benchmarks: `vlmoe bench moe` (MoE layer vs ideal and peers)"),
    "data": ("vlmoe.data.cli", "`vlmoe data demo` (offline demo data), `vlmoe data shards` (write shards)"),
    "pretrain": ("vlmoe.tasks.cli", "masked multimodal pretraining (LightningCLI); no arguments: the CPU demo"),
    "export": ("vlmoe.models.export", "checkpoints (BEiT-3, timm, vlmoe) -> safetensors + config.json"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: vlmoe <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vlmoe <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] in ("-V", "--version"):
        from vlmoe import __version__

        print(__version__)
        return
    name = argv[0]
    if name not in COMMANDS:
        raise SystemExit(f"vlmoe: unknown command {name!r}\n\n{_usage()}")
    module = importlib.import_module(COMMANDS[name][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
