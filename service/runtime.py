"""The model server's state: repository, one batcher per served version, readiness (no FastAPI)."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from service.batcher import DynamicBatcher
from service.metrics import ServiceMetrics
from service.repository import ModelRepository, ModelState, ModelVersion
from service.settings import Settings
from service.stats import ModelStats

__all__ = ["ModelServer"]

log = logging.getLogger(__name__)


class ModelServer:
    """Loads every model of the repository in the background and serves the ready ones."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository(settings.model_dir)
        self.stats: dict[tuple[str, str], ModelStats] = {}
        self.started_at = time.time()
        self.loaded = asyncio.Event()
        self.shutting_down = False
        self._load_task: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Scan the repository now; load, warm up and start batchers in a background task."""
        found = self.repository.scan()
        log.info("model repository %s: %d model versions", self.settings.model_dir, len(found))
        for mv in found:
            self.metrics.model_ready.labels(mv.name, mv.version).set(0)
        self._load_task = asyncio.get_running_loop().create_task(self._load_all(found), name="load-models")

    async def _load_all(self, versions: list[ModelVersion]) -> None:
        t0 = time.perf_counter()
        for mv in versions:
            loaded = await asyncio.to_thread(self.repository.load, mv, self.settings)
            if loaded and not self.shutting_down:
                self._serve(mv)
        self.loaded.set()
        ready = sum(mv.ready for mv in versions)
        log.info("loaded %d of %d model versions in %.2f s", ready, len(versions), time.perf_counter() - t0)

    def _serve(self, mv: ModelVersion) -> None:
        assert mv.model is not None
        stats = self.stats[(mv.name, mv.version)] = ModelStats(mv.name, mv.version)
        batcher = DynamicBatcher(
            mv.name, mv.version, mv.model.run, self.settings.batching_for(mv.name), stats, self.metrics,
            in_flight=lambda: self.metrics.in_flight,
        )
        batcher.start()
        mv.runtime = batcher
        mv.state = ModelState.READY
        self.metrics.model_ready.labels(mv.name, mv.version).set(1)
        for i, provider in enumerate(mv.model.providers):
            self.metrics.provider_info.labels(mv.name, mv.version, provider).set(1 if i == 0 else 0)

    async def stop(self) -> None:
        """Stop loading, let every batcher finish what it holds, release the sessions."""
        self.shutting_down = True
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            try:
                await self._load_task
            except asyncio.CancelledError:
                pass
        batchers = [mv.runtime for mv in self.repository.all() if mv.runtime is not None]
        await asyncio.gather(*(b.close() for b in batchers))
        for mv in self.repository.all():
            if mv.ready:
                mv.state, mv.runtime, mv.model = ModelState.UNLOADED, None, None
        log.info("all models unloaded")

    # ---- state --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Loaded and warmed up (every model, when strict), and not shutting down."""
        if not self.loaded.is_set() or self.shutting_down:
            return False
        versions = self.repository.all()
        if self.settings.strict_readiness:
            return all(mv.ready for mv in versions)
        return True

    async def infer(self, mv: ModelVersion, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``images`` (``[N, H, W, C]`` uint8) through the version's batcher."""
        batcher: DynamicBatcher = mv.runtime
        return await batcher.infer(images, self.settings.request_timeout_s)
