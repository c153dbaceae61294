"""Bad samples skipped and counted, across DataLoader worker processes (every task's data sets' base).

A sample found bad is warned about once, naming its file and the real reason (a corrupt image,
an RGB mask, a mask of the wrong size, ...), and is left out from then on: the index answers
with the next readable sample. What kind of problem it was travels to the main process as a
code in shared memory, so :meth:`SkippingDataset.skip_summary` can say, once per file, why
samples fell back, instead of calling every problem "unreadable".
"""

from __future__ import annotations

import ctypes
import multiprocessing
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch

__all__ = ["SKIP_REASONS", "SkippingDataset"]

# Why a sample was left out: index = the code kept in shared memory. Code 0 is for data sets that
# mark a sample bad without saying which kind of problem it was (their warning names it).
SKIP_REASONS = (
    "unusable (the reason is in its warning)",
    "unreadable image",
    "missing image file",
    "mask that is not a label image (RGB, ...)",
    "unreadable mask",
    "mask whose size differs from its image's",
    "mask with labels outside the configured classes",
    "image whose size differs from its annotation's",
)


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
        self._why = multiprocessing.RawArray(ctypes.c_uint8, n)
        self._reported = np.zeros(n, dtype=np.bool_)  # main process only: files already in a skip_summary

    def _record_bad(self, index: int, reason: str) -> None:
        """Mark sample ``index`` bad for the rest of the run, keeping why (one of ``SKIP_REASONS``).

        Args:
            index: the sample.
            reason: one of ``SKIP_REASONS``.
        """
        if reason not in SKIP_REASONS:
            raise ValueError(f"reason must be one of {list(SKIP_REASONS)}, got {reason!r}")
        self._bad[index] = True
        self._why[index] = SKIP_REASONS.index(reason)

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

    def skip_summary(self) -> str | None:
        """What fell back since the last :meth:`reset_skipped`, by real reason, for files not summarised before.

        Each bad file is in one summary only (its own warning named it and its reason when it
        was found); samples of files already summarised fall back silently. Call it in the
        main process, before ``reset_skipped``.

        Returns:
            e.g. ``"2 samples fell back to another image: 1 mask that is not a label image (RGB, ...),
            1 mask whose size differs from its image's (each file named above; left out from now on)"``,
            or ``None`` when nothing new was skipped.
        """
        skips = np.frombuffer(self._skips, dtype=np.int32)
        if len(self._reported) != len(skips):  # a data set pickled before this attribute existed
            self._reported = np.zeros(len(skips), dtype=np.bool_)
        new = (skips > 0) & ~self._reported
        if not new.any():
            return None
        self._reported |= new
        why = np.frombuffer(self._why, dtype=np.uint8)[new]
        counts = [(int((why == code).sum()), text) for code, text in enumerate(SKIP_REASONS)]
        reasons = ", ".join(f"{n} {text}" for n, text in counts if n)
        samples = int(skips[new].sum())
        files = int(new.sum())
        return (f"{samples} {'sample' if samples == 1 else 'samples'} fell back to another image, from {files} bad "
                f"{'file' if files == 1 else 'files'}: {reasons} (each file named above; left out from now on, not said again)")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Shared counters travel as shared memory only to processes being started
        # (DataLoader workers); any other pickling (deepcopy, torch.save) gets copies.
        if get_spawning_popen() is None:
            state["_bad"] = np.frombuffer(self._bad, dtype=np.bool_).copy()
            state["_skips"] = np.frombuffer(self._skips, dtype=np.int32).copy()
            state["_why"] = np.frombuffer(self._why, dtype=np.uint8).copy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, ctype in (("_bad", ctypes.c_bool), ("_skips", ctypes.c_int32), ("_why", ctypes.c_uint8)):
            if isinstance(state.get(key), np.ndarray):
                shared = multiprocessing.RawArray(ctype, len(state[key]))
                np.frombuffer(shared, dtype=state[key].dtype)[:] = state[key]
                state[key] = shared
        self.__dict__.update(state)
