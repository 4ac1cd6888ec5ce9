"""Per-model inference statistics in Triton's shape (``/v2/models/{m}/stats``)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

__all__ = ["ModelStats"]

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStats:
    """Counters of one model version, updated by its batcher (thread-safe)."""

    def __init__(self, name: str, version: str):
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self.inference_count = 0  # images inferred
        self.execution_count = 0  # session runs
        self.last_inference_ms = 0
        self._durations = {k: _Duration() for k in _DURATIONS}
        self._batches: dict[int, dict[str, _Duration]] = defaultdict(lambda: {k: _Duration() for k in _DURATIONS[3:]})

    def request_done(self, ok: bool, seconds: float, queue_s: float | None = None) -> None:
        with self._lock:
            self._durations["success" if ok else "fail"].add(seconds)
            if queue_s is not None:
                self._durations["queue"].add(queue_s)

    def batch_done(self, batch_size: int, input_s: float, infer_s: float, output_s: float) -> None:
        with self._lock:
            self.inference_count += batch_size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            for key, seconds in zip(_DURATIONS[3:], (input_s, infer_s, output_s)):
                self._durations[key].add(seconds)
                self._batches[batch_size][key].add(seconds)

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    **{k: d.as_dict() for k, d in self._durations.items()},
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {"batch_size": n, **{k: d.as_dict() for k, d in self._batches[n].items()}}
                    for n in sorted(self._batches)
                ],
            }
