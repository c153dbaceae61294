"""Checkpoint files written atomically and read as data only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from backbones.weights import read_checkpoint

__all__ = ["atomic_save", "read_checkpoint"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one,
    never a truncated mix: ``os.replace`` is atomic within one file system.

    Args:
        obj: what to save (tensors and plain containers, so it loads with
            ``weights_only=True``).
        path: destination file.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
