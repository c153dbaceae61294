"""Unreadable images skipped and counted, across DataLoader worker processes (both data sets' base)."""

from __future__ import annotations

import ctypes
import multiprocessing
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch

__all__ = ["SkippingDataset"]


class SkippingDataset(torch.utils.data.Dataset):
    """A data set that answers an unreadable sample with the next readable one, and counts it.

    Subclasses call :meth:`_init_skips` once their samples are known, implement ``_read``
    (the sample's image, or ``None`` after marking it bad in ``_bad``) and
    ``_nothing_readable`` (the error when no file at all can be read), and fetch with
    :meth:`_first_readable`.
    """

    def _init_skips(self, n: int) -> None:
        # Shared memory without locks (a lock from one start method cannot travel to
        # workers of another): one DataLoader worker at a time handles an index, so
        # per-index flags and counters need no lock.
        self._bad = multiprocessing.RawArray(ctypes.c_bool, n)
        self._skips = multiprocessing.RawArray(ctypes.c_int32, n)

    def _read(self, index: int) -> Any:
        raise NotImplementedError

    def _nothing_readable(self) -> str:
        raise NotImplementedError

    def _first_readable(self, index: int) -> tuple[int, Any]:
        """``(i, image)`` for the first readable sample from ``index`` on (wrapping around)."""
        n = len(self._bad)
        for step in range(n):
            i = (index + step) % n
            image = None if self._bad[i] else self._read(i)
            if image is not None:
                return i, image
            if step == 0:
                self._skips[i] += 1
        raise RuntimeError(self._nothing_readable())

    @property
    def num_skipped(self) -> int:
        """Samples skipped since the last :meth:`reset_skipped`, across worker processes."""
        return int(np.frombuffer(self._skips, dtype=np.int32).sum())

    def reset_skipped(self) -> None:
        """Reset :attr:`num_skipped` (bad files stay known and are not warned about again)."""
        np.frombuffer(self._skips, dtype=np.int32)[:] = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Shared counters travel as shared memory only to processes being started
        # (DataLoader workers); any other pickling (deepcopy, torch.save) gets copies.
        if get_spawning_popen() is None:
            state["_bad"] = np.frombuffer(self._bad, dtype=np.bool_).copy()
            state["_skips"] = np.frombuffer(self._skips, dtype=np.int32).copy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, ctype in (("_bad", ctypes.c_bool), ("_skips", ctypes.c_int32)):
            if isinstance(state[key], np.ndarray):
                shared = multiprocessing.RawArray(ctype, len(state[key]))
                np.frombuffer(shared, dtype=state[key].dtype)[:] = state[key]
                state[key] = shared
        self.__dict__.update(state)
