"""Checkpoints of a scoring run: the finished items' outputs saved in parts, so that a run stopped
(SIGTERM, SIGKILL, a crash) resumes where the last part ends and writes the same result files.

Layout of the folder: ``fingerprint.json`` (what the saved parts belong to: item count, model,
batch size, grid) and ``part-<start>-<stop>.npz`` (probabilities, orientation, features of items
``start .. stop-1``), each written to a temporary name and renamed. Parts end on batch boundaries,
so a resumed run feeds the model the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

__all__ = ["Checkpoint", "digest"]

log = logging.getLogger(__name__)

_PART = re.compile(r"^part-(\d{9})-(\d{9})\.npz$")


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class Checkpoint:
    """Saves every ``every`` items (rounded up to whole batches) of a run, and restores them.

    Args:
        folder: where the parts live (created).
        every: items between two saves.
    """

    def __init__(self, folder: Path, every: int):
        self.folder = Path(folder)
        self.every = max(1, int(every))
        self.resumed_from = 0  # items restored by the last :meth:`restore`
        self.saved = 0  # items saved so far
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def restore(self, fingerprint: dict, probs: np.ndarray, orient: np.ndarray, feats: np.ndarray | None,
                batch_size: int) -> int:
        """Fill the arrays from the saved parts that match ``fingerprint``; returns the first item
        still to score (0 when nothing matches, after clearing the folder)."""
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self._arrays = (probs, orient, feats)
        self._batch = batch_size
        self.every = -(-self.every // batch_size) * batch_size
        stored = self._read_fingerprint()
        if stored != fingerprint:
            if stored is not None:
                log.info("checkpoint in %s belongs to another run; starting again", self.folder.name)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write(self.folder / "fingerprint.json", json.dumps(fingerprint, sort_keys=True).encode())
            self.resumed_from = self.saved = 0
            return 0
        done = 0
        for start, stop, path in self._parts():
            if start != done:
                break  # a gap: what follows cannot be used
            try:
                with np.load(path) as z:
                    probs[start:stop] = z["probabilities"]
                    orient[start:stop] = z["orientation"]
                    if feats is not None:
                        feats[start:stop] = z["features"]
            except (OSError, ValueError, KeyError) as exc:
                log.warning("checkpoint part %s unreadable (%s); resuming before it", path.name, exc)
                break
            done = stop
        self.resumed_from = self.saved = done
        return done

    def update(self, done: int, total: int) -> None:
        """Called after each batch with the items done: saves a part when ``every`` items are new."""
        if self._arrays is None or done - self.saved < self.every or done == total:
            return
        if done % self._batch:
            return  # only on batch boundaries
        probs, orient, feats = self._arrays
        start, stop = self.saved, done
        arrays = {"probabilities": probs[start:stop], "orientation": orient[start:stop]}
        if feats is not None:
            arrays["features"] = feats[start:stop]
        tmp = self.folder / f".part.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / f"part-{start:09d}-{stop:09d}.npz")
        self.saved = done

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _parts(self) -> list[tuple[int, int, Path]]:
        if not self.folder.is_dir():
            return []
        parts = [(int(m[1]), int(m[2]), p) for p in self.folder.iterdir() if (m := _PART.match(p.name))]
        return sorted(parts)

    def _read_fingerprint(self) -> dict | None:
        try:
            return json.loads((self.folder / "fingerprint.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
