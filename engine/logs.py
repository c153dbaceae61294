"""Logging set-up, done once by the tools: the library only calls ``logging.getLogger(__name__)``.

Messages of this project's packages (``PACKAGES``) go to the console
(through ``tqdm.write`` so progress bars stay intact) and, for a run with an output
folder, to ``log.txt`` there; only rank 0 writes the file and prints below warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

__all__ = ["PACKAGES", "setup_logging", "log_to_file"]

PACKAGES = ("backbones", "engine", "detection", "classification", "segmentation", "deploy")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_resfpn_handler"


class _TqdmHandler(logging.StreamHandler):
    """Console output that does not tear tqdm's progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger(name) for name in PACKAGES]


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def setup_logging(*, level: int = logging.INFO, console: bool = True) -> None:
    """Send this project's log records to the console (rank 0 from ``level``, others warnings only).

    Idempotent: calling it again replaces the console handler it added before.

    Args:
        level: the lowest level shown on rank 0.
        console: print to stderr at all.
    """
    root = logging.getLogger()
    if not root.handlers:
        # Our records also propagate to the root logger. onnxruntime.quantization calls logging.basicConfig()
        # when imported, which would give an empty root a console handler of its own: every line twice.
        # basicConfig leaves a root that has any handler alone.
        root.addHandler(logging.NullHandler())
    for logger in _loggers():
        for handler in [h for h in logger.handlers if getattr(h, _MARK, None) == "console"]:
            logger.removeHandler(handler)
        logger.setLevel(min(level, logging.INFO))
        if console:
            handler = _TqdmHandler(sys.stderr)
            handler.setLevel(level if _rank() == 0 else logging.WARNING)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if level > logging.INFO else "%(message)s"))
            setattr(handler, _MARK, "console")
            logger.addHandler(handler)


@contextlib.contextmanager
def log_to_file(path: str | os.PathLike, *, level: int = logging.INFO) -> Iterator[None]:
    """Also write this project's log records to ``path`` (appending) while the block runs.

    Only rank 0 writes; a file already attached (by an outer block) is not attached twice.

    Args:
        path: the log file, e.g. ``OUTPUT/log.txt``.
        level: the lowest level written.
    """
    path = Path(path).resolve()
    attached = any(
        getattr(h, _MARK, None) == "file" and Path(getattr(h, "baseFilename", "")) == path
        for logger in _loggers() for h in logger.handlers
    )
    if _rank() != 0 or attached:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(_FORMAT))
    setattr(handler, _MARK, "file")
    saved = []
    for logger in _loggers():
        saved.append(logger.level)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, old in zip(_loggers(), saved):
            logger.removeHandler(handler)
            logger.setLevel(old)
        handler.close()
