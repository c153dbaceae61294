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
