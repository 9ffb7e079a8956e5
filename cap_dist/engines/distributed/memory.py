"""Resident memory of this process, per stage: where an actor's peak comes from.

getrusage's ru_maxrss is one peak for the whole life of the process; it cannot say whether the peak came
from loading, calibrating or solving.  A daemon thread samples /proc/self/statm every few milliseconds and
keeps the peak under the current stage's label, so the log and the manifest can say which stage to size
the actors for.  Linux only; elsewhere the stage peaks are empty and only ru_maxrss is reported.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
from collections.abc import Iterator

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0


def current_rss_mb() -> float:
    """Resident memory now, MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class StageMemory:
    """Peak resident memory per stage label, sampled every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.baseline_mb = current_rss_mb()
        self.peaks: dict[str, float] = {}
        self._stage = "idle"
        self._lock = threading.Lock()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="stage-memory", daemon=True)
        self._thread.start()

    def _record(self) -> None:
        rss = current_rss_mb()
        with self._lock:
            self.peaks[self._stage] = max(self.peaks.get(self._stage, 0.0), rss)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._record()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Attribute the memory sampled while the block runs to ``name`` (the previous label after it)."""
        with self._lock:
            previous, self._stage = self._stage, name
        self._record()
        try:
            yield
        finally:
            self._record()
            with self._lock:
                self._stage = previous

    def close(self) -> None:
        self._stop.set()


# -- giving freed memory back ------------------------------------------------------------------------
#
# glibc serves allocations below its mmap threshold from heap arenas, and raises that threshold (up to
# 32 MiB) each time a large block is freed.  An actor frees tens-of-MiB temporaries on every calibration
# batch and every solve (layer inputs, factorisations), in many threads (Ray's), so without help those
# blocks stay resident as fragmented heap: about 200 MiB per ViT-B actor whatever its share of the model,
# which is the part of its memory that does not shrink when the model is split across more actors.

M_MMAP_THRESHOLD = -3          # mallopt parameter (malloc.h)
LARGE_BLOCK_BYTES = 1 << 20    # blocks from 1 MiB up come from (and go back to) the kernel directly


def _glibc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc, not musl: both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, freed to the kernel on
    release (fixing the threshold also stops glibc from raising it).  False where the libc is not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim_heap() -> bool:
    """Return the free pages of every heap arena to the kernel (glibc malloc_trim).  True if any went back;
    False if none did, or where the libc is not glibc."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
