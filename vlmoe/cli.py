"""The single ``vlmoe`` entry point.

Each subcommand lives in its own module and is imported only when used, so ``vlmoe --help`` is fast
and a command never pays for another's dependencies. A subcommand module exposes
``main(argv: list[str]) -> Any``.

Errors the user can fix (a bad option value, a missing or malformed file, a checkpoint of another
model, ...) are printed as one line, ``vlmoe <command>: <what is wrong>``, and the command exits with
status 2; ``--debug`` (anywhere on the command line) or ``VLMOE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

from vlmoe.runtime import malloc_tuning_requested, request_huge_pages, reuse_freed_memory

request_huge_pages()  # before any command allocates: PyTorch reads the setting at its first large allocation
if malloc_tuning_requested():  # VLMOE_MALLOC_TUNING=1: freed memory reused without page faults
    reuse_freed_memory()

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("vlmoe.bench.cli", "benchmarks: `vlmoe bench moe` (MoE layer vs ideal and peers)"),
    "data": ("vlmoe.commands.data", "`vlmoe data demo` (offline demo data), `vlmoe data shards` (write shards)"),
    "pretrain": ("vlmoe.tasks.pretrain.cli", "masked multimodal pretraining (LightningCLI); no arguments: the demo"),
    "finetune": (
        "vlmoe.tasks.finetune.cli",
        "finetune TASK (vqav2, nlvr2, imagenet, captioning, retrieval, detection) and score it; no options: demo",
    ),
    "study": ("vlmoe.commands.study", "the papers' comparison: Dense / X-MoE / MH-MoE / ... x seeds x every task"),
    "evaluate": ("vlmoe.commands.evaluate", "score a results file: `vlmoe evaluate coco` (COCOeval), `captions`"),
    "analyze": ("vlmoe.commands.analyze", "`vlmoe analyze routing`: expert load / activation per layer, pictures"),
    "predict": ("vlmoe.commands.predict", "a model folder on your own images: answer, caption, classify, detect, ..."),
    "app": ("vlmoe.commands.app", "`vlmoe app --model DIR`: a local web page for a model (pip install 'vlmoe[app]')"),
    "export": ("vlmoe.commands.export", "checkpoints (BEiT-3, timm, vlmoe) -> safetensors + config.json"),
}

# What a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # bad values, malformed files (DataFormatError), shape mismatches, unknown keys
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,  # non-finite losses (NonFiniteLossError)
)
# ... and by name, for modules not imported here: Lightning's option conflicts, a missing optional extra
USER_ERROR_NAMES = frozenset({"MisconfigurationException", "MissingExtraError"})


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: vlmoe <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vlmoe <command> --help` for a command's options; --debug (or VLMOE_DEBUG=1) shows tracebacks."]
    return "\n".join(lines)


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Tracebacks wanted: ``--debug`` on the command line or ``VLMOE_DEBUG`` set to a true value."""
    env = os.environ.get("VLMOE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return env or "--debug" in (sys.argv if argv is None else argv)


def _message(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        # re-raised from a DataLoader worker: the message is the worker's traceback; keep its last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
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
    try:
        module = importlib.import_module(COMMANDS[name][0])
        module.main(argv[1:])
    except Exception as e:
        if debug or not (isinstance(e, USER_ERRORS) or type(e).__name__ in USER_ERROR_NAMES):
            raise
        print(f"vlmoe {name}: {_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
