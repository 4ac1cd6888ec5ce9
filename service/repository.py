"""The model repository: ``<root>/<name>/<version>/{model.onnx, card.json}``.

Every version with a valid card and graph (sha256 checked) is served; a broken one is kept in the
listing with the reason, reported not ready and never served. The newest ready version of a model
(numeric versions compare as numbers) answers requests that name no version.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from service.card import CardError, ModelCard
from service.errors import ModelNotReady, NotFound, Unavailable
from service.inference import OnnxModel, choose_providers, gpu_requested, provider_options
from service.settings import Settings

__all__ = ["ModelState", "ModelVersion", "ModelRepository", "version_key", "sha256_file"]

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
GRAPH_FILE = "model.onnx"


class ModelState(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


@dataclass
class ModelVersion:
    """One ``<name>/<version>`` folder and what became of it."""

    name: str
    version: str
    path: Path
    state: ModelState = ModelState.LOADING
    reason: str = ""
    card: ModelCard | None = None
    model: OnnxModel | None = None
    runtime: Any = field(default=None, repr=False)  # the batcher, attached by the app

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


def version_key(version: str) -> tuple:
    """Sort key: "2" < "10", "1.2.0" < "1.10.0"; numeric parts before text parts."""
    parts = re.split(r"[.\-_+]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    """Finds, checks and loads every model version under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions: dict[str, dict[str, ModelVersion]] = {}

    def scan(self) -> list[ModelVersion]:
        """List ``<name>/<version>`` folders (hidden ones skipped) without loading anything."""
        self.versions = {}
        if not self.root.is_dir():
            log.warning("model directory %s does not exist: serving no models", self.root)
            return []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = {
                v.name: ModelVersion(model_dir.name, v.name, v)
                for v in sorted(model_dir.iterdir(), key=lambda p: version_key(p.name))
                if v.is_dir() and not v.name.startswith(".")
            }
            if found:
                self.versions[model_dir.name] = found
        return self.all()

    def all(self) -> list[ModelVersion]:
        return [mv for versions in self.versions.values() for mv in versions.values()]

    def load(self, mv: ModelVersion, settings: Settings) -> bool:
        """Load and warm up one version; on any failure mark it FAILED with the reason and return
        False (never raises). A loaded version stays LOADING until the server starts serving it."""
        try:
            mv.card = self._read_card(mv)
            providers = choose_providers(settings.device, settings.providers, _available_providers())
            graph = self._graph_path(mv, settings, on_gpu=providers[0] == "CUDAExecutionProvider")
            mv.model = OnnxModel(
                graph, mv.card, provider_options(providers, settings.cuda_tf32),
                settings.intra_op_threads, settings.inter_op_threads, settings.allow_spinning,
            )
            if gpu_requested(settings.device, settings.providers) and not mv.model.on_gpu:
                log.warning("a GPU was asked for but %s/%s runs on %s", mv.name, mv.version, mv.model.providers)
            elif settings.device == "auto" and "CUDAExecutionProvider" in providers and not mv.model.on_gpu:
                log.warning("CUDA is available but %s/%s fell back to %s", mv.name, mv.version, mv.model.providers)
            if settings.warmup:
                bs = settings.batching_for(mv.name)
                mv.model.warmup([1, bs.max_batch_size if bs.enabled else 1])
        except Exception as exc:  # a broken model must not take the others down
            mv.state, mv.reason, mv.model = ModelState.FAILED, f"{type(exc).__name__}: {exc}", None
            log.error("model %s/%s failed to load: %s", mv.name, mv.version, mv.reason)
            return False
        log.info(
            "model %s/%s loaded on %s", mv.name, mv.version, ",".join(mv.model.providers),
            extra={"model": mv.name, "version": mv.version, "providers": mv.model.providers},
        )
        return True

    def _read_card(self, mv: ModelVersion) -> ModelCard:
        card_path = mv.path / CARD_FILE
        if not card_path.is_file():
            raise CardError(f"{card_path} is missing")
        try:
            data = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CardError(f"{card_path} is not valid JSON: {exc}") from exc
        card = ModelCard.from_dict(data)
        if card.name != mv.name or card.version != mv.version:
            raise CardError(f"card names {card.name}/{card.version} but lives in {mv.name}/{mv.version}")
        return card

    def _graph_path(self, mv: ModelVersion, settings: Settings, on_gpu: bool) -> Path:
        """The fp32 graph, or on CUDA (and with ``prefer_fp16``) the card's fp16 graph."""
        card = mv.card
        assert card is not None
        graph, digest = mv.path / GRAPH_FILE, card.sha256
        if on_gpu and settings.prefer_fp16 and card.fp16_file:
            graph, digest = mv.path / card.fp16_file, card.fp16_sha256
        if not graph.is_file():
            raise FileNotFoundError(f"{graph} is missing")
        if digest is not None:
            actual = sha256_file(graph)
            if actual != digest.lower():
                raise CardError(f"sha256 of {graph.name} is {actual}, card says {digest}")
        return graph

    # ---- lookup -------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The version to serve: raises NotFound for unknown names, Unavailable (503) while it loads,
        ModelNotReady (400) when it failed or was unloaded."""
        mv = self.find(name, version)
        if mv.state is ModelState.LOADING:  # transient: come back shortly
            raise Unavailable(f"model '{name}' version '{mv.version}' is not ready yet (LOADING)", {"Retry-After": "1"})
        if not mv.ready:
            detail = f": {mv.reason}" if mv.reason else ""
            raise ModelNotReady(f"model '{name}' version '{mv.version}' is not ready ({mv.state.value}{detail})")
        return mv

    def find(self, name: str, version: str | None = None) -> ModelVersion:
        """A version whatever its state (metadata and readiness of broken models)."""
        versions = self.versions.get(name)
        if not versions:
            raise NotFound(f"unknown model '{name}'" + _known(self.versions))
        if version is None:
            return self.default(name)
        if version not in versions:
            raise NotFound(f"model '{name}' has no version '{version}' (versions: {', '.join(versions)})")
        return versions[version]

    def default(self, name: str) -> ModelVersion:
        """Newest ready version; the newest of all when none is ready (to report why)."""
        ordered = sorted(self.versions[name].values(), key=lambda mv: version_key(mv.version))
        ready = [mv for mv in ordered if mv.ready]
        return (ready or ordered)[-1]


def _known(versions: dict) -> str:
    return f" (models: {', '.join(versions)})" if versions else " (no models are served)"


def _available_providers() -> list[str]:
    return ort.get_available_providers()
