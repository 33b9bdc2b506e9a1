"""Wall time and peak memory of each part of a long job (a round: load, adapt, judge, write, export).

    parts = Parts()
    with parts("adapt"):
        ...
    parts.rows  # {"adapt": {"seconds": 12.3, "peak_rss_mb": 612.0}, ...}

On Linux the process's high-water mark is reset at the start of each part (/proc/self/clear_refs),
so `peak_rss_mb` is the peak *within* that part; elsewhere it is the peak so far (ru_maxrss), and
`peak_is_per_part` says which.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_mb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process's RSS; False where that is not possible."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS since the last reset (or since it started)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # no /proc: the peak of the whole life (kB on Linux, bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # musl or a static build: nothing to tune
        return None


# A round's blocks of this size and more are mapped on their own. 4 MB left an INT8 round's peak
# (calibration holds every activation of a frame, ~100 arrays of 1-12 MB) just over 800 MB at the
# edge model's 256 x 512; 1 MB brought it about 30 MB lower, at about a tenth more round time
# (tools/bench_round.py --mmap-threshold-mb, docs/results/speed.md).
MMAP_THRESHOLD_MB = 1


def tame_heap(mmap_threshold_mb: int | None = None) -> bool:
    """For a process that allocates and frees big tensors part after part (a round): glibc serves
    every block under its mmap threshold from the heap and keeps it when freed, and it raises that
    threshold after each big free (up to 32 MB), so a round's activations would stay resident
    after the part that needed them. A fixed threshold (MMAP_THRESHOLD_MB) maps big blocks on their
    own and unmaps them at free. False where this is not glibc."""
    mmap_threshold_mb = MMAP_THRESHOLD_MB if mmap_threshold_mb is None else mmap_threshold_mb
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold_mb) << 20) == 1
    return ok and libc.mallopt(m_trim_threshold, 16 << 20) == 1


def release_memory() -> None:
    """Hand freed memory back to the system now: Python's cycles first, then glibc's free lists."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class Parts:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.peak_is_per_part = True

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        release_memory()  # the part before leaves no garbage that this one's peak would count
        self.peak_is_per_part = _reset_peak() and self.peak_is_per_part
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.rows[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                               "rss_after_mb": _status_mb("VmRSS") or float("nan")}
