"""What every task's data shares: the error for a data folder that cannot be used, the cache of generated sets.

The built-in shapes sets (detection, classification crops, semantic maps) are generated
once into ``$RESFPN_CACHE`` (default ``~/.cache/resfpn``), each through
``generate_atomically`` so an interrupted run never leaves half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["DataPathError", "cache_root", "generate_atomically"]


class DataPathError(FileNotFoundError):
    """A data folder that is missing or not in the layout its task reads."""


def cache_root() -> Path:
    """Where generated data sets live: ``$RESFPN_CACHE``, or ``~/.cache/resfpn``."""
    return Path(os.environ.get("RESFPN_CACHE", Path.home() / ".cache" / "resfpn"))


def generate_atomically(root: Path, generate: Callable[[Path], Any]) -> None:
    """Write a generated data set to ``root`` so that an interrupted run never leaves half of one.

    ``generate`` fills a fresh folder beside ``root``, which then replaces ``root``.

    Args:
        root: the data set's folder (replaced when it exists).
        generate: writes the data set into the folder it is given.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        generate(tmp)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
