"""What the command-line tools share: which errors are the user's, and how flags become values.

Only ``tools/`` print and exit; this module raises nothing and prints nothing.
"""

from __future__ import annotations

import torch

from backbones.weights import WeightsError

from .config import ConfigError
from .data.coco import AnnotationError
from .data.roots import DataPathError

__all__ = ["DEVICES", "DTYPES", "USER_ERRORS", "parse_dtype"]

# A user's mistake (a flag, a file, a folder): one "error: ..." line and exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, WeightsError, DataPathError, AnnotationError, FileNotFoundError)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    """``"float32"`` -> ``None`` (full precision), ``"bfloat16"`` / ``"float16"`` -> the torch dtype.

    Args:
        name: one of ``DTYPES``.
    """
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]
