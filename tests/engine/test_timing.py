"""engine.timing's peak-memory counters: a growth measured from one source, never negative."""

import mmap
from pathlib import Path

from engine import timing


def _grow_and_free(mib: int) -> None:
    # Fresh anonymous pages, each touched: a freed tensor's memory may come back from the allocator's cache
    # without any new resident page.
    block = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, mib * 2**20, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_peak_growth_counts_an_allocation():
    before = timing.reset_peak_rss()
    _grow_and_free(64)
    assert timing.peak_rss_mb() - before > 48


def test_refused_reset_gives_an_upper_bound_not_a_negative_growth(monkeypatch):
    # CI's sandbox refused /proc/self/clear_refs; the baseline then came from getrusage's peak, which on
    # Linux keeps what the parent (a pytest worker of a few GiB) held when it forked and exec'd this process,
    # and the peak from VmHWM: a negative growth.
    write_text = Path.write_text

    def refuse_clear_refs(self, *args, **kwargs):
        if self.name == "clear_refs":
            raise PermissionError(13, "Permission denied", str(self))
        return write_text(self, *args, **kwargs)

    class Usage:
        ru_maxrss = 8 * 2**20  # KiB: 8 GiB held before exec

    monkeypatch.setattr(Path, "write_text", refuse_clear_refs)
    monkeypatch.setattr(timing.resource, "getrusage", lambda who: Usage)
    before = timing.reset_peak_rss()
    _grow_and_free(16)
    assert timing.peak_rss_mb() - before >= 0


def test_without_proc_both_counters_fall_back_together(monkeypatch):
    def no_proc(field):
        raise OSError(2, "No such file or directory", "/proc/self/status")

    monkeypatch.setattr(timing, "_status_mb", no_proc)
    before = timing.reset_peak_rss()
    _grow_and_free(16)
    assert timing.peak_rss_mb() - before >= 0


def test_cpu_peak_is_measured_while_another_thread_holds_a_lock():
    # What thread pools (OpenMP/oneDNN, OpenVINO) do: a worker holds a lock the measured call needs. A child
    # forked at that moment inherits the lock held forever, so the call hung there and the peak came back None
    # in the parallel test run. Measured in this process, the call waits for the worker and goes on.
    import threading

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)  # torch's own pool started, as in the benchmark's process
    torch.set_num_threads(threads)  # this worker's share, as conftest set it
    lock, held, release = threading.Lock(), threading.Event(), threading.Event()

    def worker():
        with lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    held.wait(10)

    def call():
        threading.Timer(0.2, release.set).start()  # the worker finishes its job while the call waits on it
        assert lock.acquire(timeout=5), "the lock a worker held before the measurement was never released"
        lock.release()
        _grow_and_free(32)

    try:
        peak = timing.peak_memory_mb(call, torch.device("cpu"))
    finally:
        release.set()
        thread.join()
    assert peak is not None and peak > 24


def test_measure_peak_rss_returns_the_result_and_a_growth_never_negative(monkeypatch):
    result, growth = timing.measure_peak_rss(lambda: _grow_and_free(32) or "done")
    assert result == "done" and growth > 24
    # Counters read a little lower after the call than before it (lazy kernel updates): no negative growth.
    readings = iter([(100.0, 100.0), (99.9, 99.9)])
    monkeypatch.setattr(timing, "_rss_now_and_peak", lambda: next(readings))
    assert timing.measure_peak_rss(lambda: None) == (None, 0.0)


def test_the_peak_starts_again_from_a_reset():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        import pytest

        pytest.skip("this sandbox refuses /proc/self/clear_refs: the peak is the lifetime one (an upper bound)")
    _grow_and_free(64)  # a peak well above what the process holds now
    before = timing.reset_peak_rss()
    assert timing.peak_rss_mb() - before < 32, "the peak of an earlier allocation survived reset_peak_rss"


def test_time_calls_warms_up_then_interleaves_and_reports_medians(monkeypatch):
    from types import SimpleNamespace

    import torch

    clock = [0.0]
    calls: list[str] = []

    def candidate(name, durations):
        it = iter(durations)

        def call():
            calls.append(name)
            clock[0] += next(it)
        return call

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    fns = {"a": candidate("a", [100.0, 1.0, 1.0, 10.0]), "b": candidate("b", [100.0, 2.0, 2.0, 2.0])}  # one slow first call each
    times = timing.time_calls(fns, reps=3, warmup=1, device=torch.device("cpu"))
    assert times == {"a": [1.0, 1.0, 10.0], "b": [2.0, 2.0, 2.0]}, "the warm-up call must not be timed"
    assert calls == ["a", "b"] * 4  # warm-up, then rep by rep
    fns = {"a": candidate("a", [100.0, 1.0, 1.0, 10.0]), "b": candidate("b", [100.0, 2.0, 2.0, 2.0])}
    assert timing.time_interleaved(fns, reps=3, warmup=1, device=torch.device("cpu")) == {"a": 1.0, "b": 2.0}  # medians
