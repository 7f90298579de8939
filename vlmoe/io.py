"""Files vlmoe writes and checkpoints it reads: one atomic writer, one safe loader.

Every file vlmoe produces (checkpoints, exports, configs, metrics, predictions, shards' ``sizes.json``)
goes through :func:`atomic_write`: the bytes go to a temporary file *beside* the target (same
filesystem, so the final rename is atomic), are flushed to disk, the file gets the mode a plain
``open()`` would give it (``0666 & ~umask``), and is renamed over the target; the directory entry is
flushed too. A reader therefore sees the old complete file or the new complete file, never a torn
one, and a kill mid-write leaves only a hidden temporary named ``.<target>.<random>.tmp``, which
:func:`remove_stale_temporaries` cleans on the next start.

:func:`torch_load` reads ``torch.save`` files without unpickling code (``weights_only=True``) and
turns torch's long failure texts into one line that says what is wrong with the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_SUFFIX",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
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
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the target file (its folder is created if needed).
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        overwrite: False: refuse (``FileExistsError``) when ``path`` exists.

    Yields:
        The open file object. Raising inside the block removes the temporary and leaves ``path``
        as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600
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
        ValueError: the file is not a torch checkpoint, is truncated / corrupt, or holds Python
            objects other than tensors and containers (named; code is never unpickled).
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
        marker = "Unsupported global: GLOBAL "
        if marker in text:
            name = text.split(marker, 1)[1].split()[0]
            raise ValueError(
                f"{path}: holds Python objects other than tensors ({name}); vlmoe never unpickles code "
                "(torch.load weights_only=True). Re-save its state dict with torch.save(model.state_dict())."
            ) from None
        raise ValueError(f"{path}: not a checkpoint or corrupt (torch.load cannot read it)") from None
