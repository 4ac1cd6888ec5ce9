"""The model repository: ``<root>/<name>/<version>/{model.onnx, card.json}`` (names from
:mod:`gsa_contract`). It only discovers and validates: serving is :mod:`service.runtime`'s.

A version is valid when its card passes :meth:`gsa_contract.ModelCard.from_dict`, names the folder
it lives in, and its graph's sha256 matches the card. Invalid versions are listed with the reason
(the runtime reports them not ready and never serves them).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from gsa_contract import GRAPH_FILE, CardError, ModelCard, read_card

__all__ = ["VersionEntry", "ModelRepository", "version_key", "sha256_file", "best_pathology_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionEntry:
    """One ``<name>/<version>`` folder: its validated card, or why it is unusable."""

    name: str
    version: str
    path: Path
    card: ModelCard | None = None
    error: str = ""

    @property
    def valid(self) -> bool:
        return self.card is not None and not self.error

    def graph(self, fp16: bool = False) -> Path:
        """The fp32 graph, or the card's fp16 graph (``fp16`` and the card has one), sha256 checked.

        Raises:
            CardError: the file is missing or its sha256 differs from the card's.
        """
        if self.card is None:
            raise CardError(self.error or f"{self.name}/{self.version} has no card")
        name, digest = GRAPH_FILE, self.card.sha256
        if fp16 and self.card.fp16_file:
            name, digest = self.card.fp16_file, self.card.fp16_sha256
        path = self.path / name
        if not path.is_file():
            raise CardError(f"{name} is missing")
        actual = sha256_file(path)
        if digest is not None and actual != digest.lower():
            raise CardError(f"sha256 of {name} is {actual}, card says {digest}")
        return path


def version_key(version: str) -> tuple:
    """Sort key: "2" < "10", "1.2.0" < "1.10.0"; numeric parts before text parts."""
    parts = re.split(r"[.\-_+]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def best_pathology_model(cards: Iterable[ModelCard]) -> str | None:
    """The name of the pathology model (RGB, with an ``mpp``) among ``cards`` (one per model: its
    default version) whose card reports the highest validation accuracy (``metrics.best.val_acc``;
    ties go to the later name); None when there is none."""
    def accuracy(card: ModelCard) -> float:
        best = card.metrics.get("best")
        value = best.get("val_acc") if isinstance(best, dict) else None
        return float(value) if isinstance(value, (int, float)) else -1.0

    candidates = [card for card in cards if card.mpp is not None and card.channels == 3]
    return max(candidates, key=lambda card: (accuracy(card), card.name)).name if candidates else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    """Finds and validates every model version under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def scan(self) -> list[VersionEntry]:
        """Every ``<name>/<version>`` folder (hidden ones skipped), versions in ascending order."""
        if not self.root.is_dir():
            log.warning("model directory %s does not exist: serving no models", self.root)
            return []
        entries = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for folder in sorted(model_dir.iterdir(), key=lambda p: version_key(p.name)):
                if folder.is_dir() and not folder.name.startswith("."):
                    entries.append(self.validate(model_dir.name, folder.name, folder))
        return entries

    def validate(self, name: str, version: str, path: Path) -> VersionEntry:
        """The entry of one folder: card read and checked, fp32 graph present with its sha256."""
        try:
            card = read_card(path)
            if card.name != name or card.version != version:
                raise CardError(f"card names {card.name}/{card.version} but lives in {name}/{version}")
            entry = VersionEntry(name, version, path, card)
            entry.graph(fp16=False)
        except (CardError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("model %s/%s is not valid: %s", name, version, reason)
            return VersionEntry(name, version, path, None, reason)
        return entry
