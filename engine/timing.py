"""Timing and memory measurement, one way for every tool: interleaved repetitions, medians, peaks.

``time_calls`` is the one timing loop (warm-up, then the candidates interleaved rep by
rep, synchronised on CUDA); ``run_in_own_process`` isolates a candidate in a spawned
process; peak memory is CUDA's allocator peak or the growth of the measuring process's
own peak RSS (Linux ``clear_refs``), never a forked child's.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["measure_peak_rss", "peak_memory_mb", "peak_rss_mb", "reset_peak_rss", "run_in_own_process", "sync", "time_calls", "time_interleaved"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call for each candidate, calls interleaved rep by rep (drift hits all alike).

    Args:
        fns: name -> a call to time.
        reps: timed calls of each.
        warmup: untimed calls of each first.
        device: synchronised around every call (CUDA).
    """
    return {k: statistics.median(v) for k, v in time_calls(fns, reps, warmup, device).items()}


def time_calls(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every timed call of each candidate, interleaved rep by rep: the one timing loop.

    Args:
        fns: name -> a call to time.
        reps: timed calls of each.
        warmup: untimed calls of each first.
        device: synchronised around every call (CUDA).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of one call, in MiB: ``max_memory_allocated`` over what was allocated before it on CUDA,
    on the CPU the growth of this process's peak RSS during the call (``measure_peak_rss``).

    The call runs here, in the caller's process: a child forked from a process whose thread
    pools (OpenMP/oneDNN, OpenVINO) hold a lock inherits the lock held forever and may hang.
    To keep one candidate's allocations from another's, call it in a process of its own
    (``run_in_own_process``), as the benchmark's CPU rows do.

    Args:
        fn: the call to measure.
        device: where it runs.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return measure_peak_rss(fn)[1]


def measure_peak_rss(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` here; return its result and the growth of the process's peak RSS during it, in MiB.

    The growth is ``peak_rss_mb() - reset_peak_rss()`` around the call, never below 0 (the
    kernel's RSS counters are updated lazily, so an idle process can read a few KiB less
    after a reset than before it). Memory the allocator already holds is reused and not counted.

    Args:
        fn: the call to measure.
    """
    before = reset_peak_rss()
    result = fn()
    return result, max(0.0, peak_rss_mb() - before)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rss_now_and_peak() -> tuple[float, float]:
    # Both from one source, so that their difference means something: /proc's VmRSS and VmHWM, or, without
    # them, getrusage's lifetime peak twice (which on Linux also counts what the process held before exec).
    try:
        return _status_mb("VmRSS"), _status_mb("VmHWM")
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); return the RSS in MiB.

    ``peak_rss_mb() - reset_peak_rss()`` is then the peak growth from here, never negative. Where
    the reset is refused (some sandboxes) the peak stays the process's lifetime one and the
    difference is an upper bound.
    """
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_now_and_peak()[0]


def peak_rss_mb() -> float:
    """The process's peak RSS in MiB (since ``reset_peak_rss``)."""
    return _rss_now_and_peak()[1]


def run_in_own_process(target: Callable[[dict[str, Any], Any], None], spec: dict[str, Any], *, in_process: bool = False) -> dict[str, Any]:
    """Run ``target(spec, queue)`` in a fresh (spawned) process and return what it puts on the queue.

    One candidate's memory and thread pools cannot slow another this way. ``target``
    must be importable (a module-level function) and put exactly one dict.

    Args:
        target: the measurement, run in the child.
        spec: its description (picklable).
        in_process: run it here instead (no process start, ~5 s of imports saved per
            candidate; candidates then share one allocator and thread pool, so the numbers
            check the tool rather than compare the candidates).

    Raises:
        RuntimeError: the child exited without a result (an import error, the OOM killer).
    """
    if in_process:
        results: queue_mod.Queue = queue_mod.Queue()
        target(spec, results)
        return results.get_nowait()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(spec, queue))
    proc.start()
    try:
        result = None
        while result is None:
            try:
                result = queue.get(timeout=5)
            except queue_mod.Empty:
                # A candidate that died (an import error, the OOM killer) puts nothing; say so instead of waiting.
                if not proc.is_alive() and queue.empty():
                    raise RuntimeError(f"the timing process for {spec.get('name', spec)} exited with code {proc.exitcode} and no result") from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return result
