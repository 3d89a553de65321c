"""CPU, wall time and memory of the current process, for the benchmark children."""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Linux resets a process's peak RSS (VmHWM) when "5" is written here (proc(5)).
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class Sample:
    """The cost of one measured phase to the current process."""

    wall_seconds: float
    cpu_seconds: float
    # Wall time spent in the cyclic garbage collector, part of the above.
    gc_seconds: float
    # Peak RSS of the process since it started, or None off Linux.
    max_rss_mb: float | None
    # Peak RSS since the phase started (VmHWM after a reset), or None where
    # the kernel does not support the reset.
    phase_peak_rss_mb: float | None


class _GcTimer:
    """Adds up the time the cyclic garbage collector runs, through gc.callbacks."""

    def __init__(self) -> None:
        self.total_seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total_seconds += time.perf_counter() - self._started


_gc_timer: _GcTimer | None = None


def gc_seconds() -> float:
    """Return the wall time the cyclic garbage collector has run since the first call."""
    global _gc_timer
    if _gc_timer is None:
        _gc_timer = _GcTimer()
    return _gc_timer.total_seconds


class Stopwatch:
    """Measures wall time, process CPU time, GC time and peak RSS between start and stop."""

    def __init__(self) -> None:
        self._wall = 0.0
        self._cpu = 0.0
        self._gc = 0.0
        self._hwm_reset = False

    def start(self) -> None:
        self._hwm_reset = reset_peak_rss()
        self._gc = gc_seconds()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> Sample:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        return Sample(
            wall_seconds=wall,
            cpu_seconds=cpu,
            gc_seconds=gc_seconds() - self._gc,
            max_rss_mb=max_rss_mb(),
            phase_peak_rss_mb=peak_rss_mb() if self._hwm_reset else None,
        )


# The highest VmHWM read before a reset, so that resets do not lose the
# process's peak.
_peak_before_resets_mb = 0.0


def max_rss_mb() -> float | None:
    """Return the process's peak RSS since it started in MB (10^6 bytes), or None off Linux.

    getrusage's ru_maxrss cannot be used: Linux carries it over from the
    parent across fork and exec, so a child started by a parent with a large
    RSS reports the parent's peak. VmHWM belongs to the child's own address
    space, and this function adds back the peaks that resets cleared.
    """
    peak = peak_rss_mb()
    if peak is None:
        return None
    return max(peak, _peak_before_resets_mb)


def current_rss_mb() -> float | None:
    """Return the process's RSS now (VmRSS) in MB, or None off Linux."""
    return _status_kb("VmRSS")


def peak_rss_mb() -> float | None:
    """Return the process's peak RSS since the last reset (VmHWM) in MB."""
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; return False where that is not possible."""
    global _peak_before_resets_mb
    peak = peak_rss_mb()
    if peak is not None:
        _peak_before_resets_mb = max(_peak_before_resets_mb, peak)
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_kb(field: str) -> float | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return None


def sample_dict(sample: Sample, **extra: Any) -> dict[str, Any]:
    result = asdict(sample)
    result.update(extra)
    return result


def emit(message: dict[str, Any]) -> None:
    """Write one JSON line to stdout, which the benchmark parent reads."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
