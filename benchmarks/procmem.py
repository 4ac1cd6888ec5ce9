"""Resident memory of this process, for the benchmarks (Linux ``/proc``; ``ru_maxrss`` elsewhere).

Peaks come from ``VmHWM``, reset with :func:`reset_peak` just before what is measured. Not
``ru_maxrss``: Linux carries it over ``fork`` + ``exec``, so a benchmark's child process would
start at its parent's resident set.
"""

from __future__ import annotations

import resource

__all__ = ["rss_mb", "peak_mb", "reset_peak"]


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set (MB)."""
    current = _status_mb("VmRSS:")
    return _maxrss_mb() if current is None else current


def peak_mb() -> float:
    """Peak resident set (MB) since the process started or :func:`reset_peak` last succeeded."""
    peak = _status_mb("VmHWM:")
    return _maxrss_mb() if peak is None else peak


def reset_peak() -> bool:
    """Reset the kernel's peak counter to the current resident set (Linux 4.0+: ``5`` to
    ``clear_refs``); False where that is not possible (the peak then covers everything before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
