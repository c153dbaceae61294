"""Writing files so that a kill at any moment loses nothing: a temporary file in the same folder, then a rename.

Every file this project writes for a model or a run (checkpoints, exported models,
``metrics.jsonl`` rewrites) goes through ``atomic_write``; ``os.replace`` is atomic
within one file system, so a reader sees the previous file or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_save", "atomic_write", "atomic_write_text", "file_mode"]


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the umask (``mkstemp`` makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: destination file (its folder is created).
        write: writes the whole content to the binary file it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` (tensors and plain containers, so it loads with ``weights_only=True``) atomically.

    Args:
        obj: what to save.
        path: destination file.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: destination file.
        text: its whole new content.
    """
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
