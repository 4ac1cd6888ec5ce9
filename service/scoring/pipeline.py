"""Reading overlapped with inference: reader threads load batches ahead (``prefetch`` of them, so
memory holds at most ``prefetch + 1`` batches of pixels) while the calling thread runs the model on
the oldest one."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence, TypeVar

import numpy as np

from gsa_contract import FEATURES, ORIENTATION_RESPONSES, PROBABILITIES, ModelCard
from service.scoring.scoring_errors import BadParameter, Cancelled

if TYPE_CHECKING:
    from service.scoring.checkpoint import Checkpoint

__all__ = ["ScoringModel", "PipelineStats", "Scores", "run_pipeline", "batched", "score_items"]

Spec = TypeVar("Spec")


class ScoringModel(Protocol):
    """What the engine needs of a model: its card and a run (``service.inference.OnnxModel`` fits)."""

    card: ModelCard

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class PipelineStats:
    images: int = 0
    batches: int = 0
    wall_s: float = 0.0
    model_s: float = 0.0  # time inside model.run
    wait_s: float = 0.0  # time the model waited for readers
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        rate = self.images / self.wall_s if self.wall_s > 0 else None
        return {"images": self.images, "batches": self.batches, "wall_s": round(self.wall_s, 3),
                "model_s": round(self.model_s, 3), "reader_wait_s": round(self.wait_s, 3), "images_per_s": rate}


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_pipeline(
    model: ScoringModel,
    specs: Iterable[Spec],
    load: Callable[[Spec], np.ndarray],
    consume: Callable[[Spec, dict[str, np.ndarray]], None],
    *,
    readers: int = 1,
    prefetch: int = 4,
    cancel: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> PipelineStats:
    """For each batch spec in order: ``load`` it (in a reader thread), run the model, ``consume`` the
    outputs. ``progress`` gets the number of images just done. Reader errors surface here.

    Raises:
        Cancelled: ``cancel`` was set (checked between batches).
    """
    stats = PipelineStats()
    t0 = time.perf_counter()
    it = iter(specs)
    pending: deque[tuple[Spec, Future]] = deque()
    with ThreadPoolExecutor(max(1, readers), thread_name_prefix="score-reader") as pool:
        def submit() -> None:
            for spec in it:
                pending.append((spec, pool.submit(load, spec)))
                return

        try:
            for _ in range(max(1, prefetch)):
                submit()
            while pending:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                spec, future = pending.popleft()
                tw = time.perf_counter()
                images = future.result()
                stats.wait_s += time.perf_counter() - tw
                submit()
                tm = time.perf_counter()
                outputs = model.run(images)
                stats.model_s += time.perf_counter() - tm
                consume(spec, outputs)
                stats.images += len(images)
                stats.batches += 1
                if progress is not None:
                    progress(len(images))
        finally:
            for _, future in pending:
                future.cancel()
    stats.wall_s = time.perf_counter() - t0
    return stats


class Scores(NamedTuple):
    """What :func:`score_items` returns."""

    probabilities: np.ndarray  # n, K
    orientation: np.ndarray  # n: the group element where the predicted class responds most
    stats: PipelineStats
    features: np.ndarray | None  # n, D, G (float32) when asked for, else None


def score_items(
    model: ScoringModel,
    n: int,
    load: Callable[[range], np.ndarray],
    *,
    batch_size: int,
    readers: int = 1,
    prefetch: int = 4,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    features: bool = False,
    checkpoint: "Checkpoint | None" = None,
    fingerprint: dict | None = None,
) -> Scores:
    """Score items ``0 .. n-1`` in batches of ``batch_size`` (``load(range)`` gives their pixels):
    probabilities ``[n, K]``, per item the group element with the strongest response of the
    predicted class ``[n]``, and with ``features`` the model's ``[n, D, G]`` features (the model
    must output them). ``progress(done, n)`` after every batch (and once with 0, or with the items
    a ``checkpoint`` restored: those are not scored again; ``fingerprint`` says what the checkpoint
    must belong to)."""
    probs = np.full((n, model.card.num_classes), np.nan, np.float32)
    orient = np.zeros(n, np.int16)
    feats = None
    if features:
        if model.card.feature_dim is None:
            raise BadParameter(f"model '{model.card.name}' version '{model.card.version}' was exported without "
                               "features: no embeddings to write")
        feats = np.full((n, model.card.feature_dim, model.card.group_order), np.nan, np.float32)
    done = 0
    if checkpoint is not None:
        done = checkpoint.restore({**(fingerprint or {}), "n": n, "batch_size": batch_size, "features": features},
                                  probs, orient, feats, batch_size)

    def consume(idx: range, outputs: dict[str, np.ndarray]) -> None:
        p = outputs[PROBABILITIES]
        probs[idx.start:idx.stop] = p
        orient[idx.start:idx.stop] = outputs[ORIENTATION_RESPONSES][np.arange(len(p)), p.argmax(1)].argmax(-1)
        if feats is not None:
            feats[idx.start:idx.stop] = outputs[FEATURES]

    def step(count: int) -> None:
        nonlocal done
        done += count
        if checkpoint is not None:
            checkpoint.update(done, n)
        if progress is not None:
            progress(done, n)

    if progress is not None:
        progress(done, n)
    stats = run_pipeline(model, batched(range(done, n), batch_size), load, consume, readers=readers,
                         prefetch=prefetch, cancel=cancel, progress=step)
    return Scores(probs, orient, stats, feats)
