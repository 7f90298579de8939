"""Files vlmoe writes and reads: one atomic writer, one safe checkpoint loader, JSON readers whose errors
name the file and the position.

Every file vlmoe produces (checkpoints, exports, configs, metrics, predictions, shards' ``sizes.json``)
goes through :func:`atomic_write`: the bytes go to a temporary file *beside* the target (same
filesystem, so the final rename is atomic), are flushed to disk, the file gets the mode a plain
``open()`` would give it (``0666 & ~umask``; a copy no more than its source's), and is renamed over the
target; the directory entry is flushed too. A reader therefore sees the old complete file or the new
complete file, never a torn one, and a kill mid-write leaves only a hidden temporary named
``.<target>.<random>.tmp``, which :func:`remove_stale_temporaries` cleans on the next start. A
directory is never replaced.

:func:`torch_load` reads ``torch.save`` files without unpickling code (``weights_only=True``) and
turns torch's long failure texts into one line that says what is wrong with the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_SUFFIX",
    "DataFormatError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "load_json",
    "load_jsonl",
    "remove_stale_temporaries",
    "torch_load",
]

TMP_SUFFIX = ".tmp"


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True, permissions: int | None = None
) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the target file (its folder is created if needed; a directory there is an
            ``IsADirectoryError``, whatever ``overwrite`` says).
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        overwrite: False: refuse (``FileExistsError``) when ``path`` exists.
        permissions: the most the file may allow, e.g. the mode of the file it copies: it gets
            ``0666 & ~umask & permissions``.

    Yields:
        The open file object. Raising inside the block removes the temporary and leaves ``path``
        as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; vlmoe writes a file there and never replaces a directory")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode() & (0o777 if permissions is None else permissions))  # mkstemp: 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename is durable once the directory entry is on disk


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", overwrite=overwrite) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, indent: int | None = None, *, overwrite: bool = True
) -> Path:
    """Write ``obj`` as JSON (UTF-8, keys in insertion order, compact unless ``indent``) atomically."""
    # json.dumps encodes in C in one go; json.dump streams through the slower Python encoder.
    text = json.dumps(obj, indent=indent, ensure_ascii=False, separators=None if indent else (",", ":"))
    return atomic_write_text(path, text + ("\n" if indent else ""), overwrite=overwrite)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    with atomic_write(path, "wb", overwrite=overwrite) as f:
        torch.save(obj, f)
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike, older_than: float = 0.0) -> list[Path]:
    """Delete the temporaries :func:`atomic_write` leaves when a process is killed mid-write.

    Only files named ``.<name>.<random>.tmp`` (the writer's own pattern) are touched, and only those
    last modified more than ``older_than`` seconds ago (a writer still running elsewhere keeps its
    file).

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.name.count(".") >= 3 and p.is_file()):
            continue
        try:
            if now - p.stat().st_mtime >= older_than:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            continue
    return removed


def torch_load(path: str | os.PathLike, *, allow: tuple[type, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what is wrong.

    Args:
        path: a file written by ``torch.save``.
        allow: extra plain-data classes to accept (e.g. ``argparse.Namespace``, which BEiT-3's
            training checkpoints store).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a torch checkpoint, is truncated / corrupt, or is refused because
            unpickling it would import or call Python code (the name it asks for is given); vlmoe has no
            option to unpickle code.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        text = str(e)
        fix = ("if you trust the file, re-save its tensors with torch.save(model.state_dict()) or as safetensors; "
               "vlmoe has no option to unpickle code")
        # torch names the global its safe unpickler refused: "Unsupported global: GLOBAL argparse.Namespace
        # was not an allowed global" or "unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
        if found:
            raise ValueError(
                f"{path}: holds Python objects other than tensors ({found[1]}); refused: unpickling it would run code "
                f"(import and call {found[1]}; vlmoe loads with torch.load weights_only=True); {fix}"
            ) from None
        opcode = re.search(r"Unsupported operand (\d+)", text)
        if opcode and _is_a_pickle(path):
            name = _pickle_opcode_name(int(opcode[1]))
            raise ValueError(
                f"{path}: a pickle that the safe loader (torch.load weights_only=True) refuses (pickle opcode "
                f"{name}); unpickling it fully could run code; {fix}"
            ) from None
        raise ValueError(f"{path}: not a checkpoint or corrupt (torch.load cannot read it)") from None


def _is_a_pickle(path: Path) -> bool:
    """Whether the file is a well-formed pickle: its opcodes are parsed up to STOP, none is executed."""
    import pickletools

    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
    except Exception:  # pickletools raises ValueError, EOFError, struct.error, ... on anything else
        return False
    return True


def _pickle_opcode_name(code: int) -> str:
    """``149`` -> ``"FRAME"`` (the number itself when no opcode has it)."""
    import pickletools

    op = next((o for o in pickletools.opcodes if ord(o.code) == code), None)
    return op.name if op else str(code)


# ---------------------------------------------------------------------------------------------- reading
class DataFormatError(ValueError):
    """A data file does not follow the expected format; the message names file and position."""


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, turning a syntax error into one that names the file, line and column.

    Args:
        path: the JSON file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}"
            ) from None


def load_jsonl(path: str | os.PathLike) -> list[Any]:
    """Parse a JSON-lines file (one JSON value per non-empty line).

    A file that holds one JSON array instead (some releases name JSONL files ``.json``) is also
    accepted.

    Args:
        path: the JSONL file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return load_json(path)
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: malformed JSON on line {lineno}, column {e.colno}: {e.msg}") from None
    return rows
