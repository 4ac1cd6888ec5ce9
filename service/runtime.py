"""The model server's state (no FastAPI): which versions are served, each as a typed
:class:`ServedModel` (card, ONNX Runtime session, dynamic batcher).

Requests and scoring jobs reach a model through the same :class:`ServedModel` and so through the
same batcher: its queue bound, overload answers and fairness hold for both.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from gsa_contract import ModelCard
from service.batcher import DynamicBatcher
from service.errors import ModelNotReady, NotFound, Overloaded, RequestTimeout, Unavailable
from service.inference import OnnxModel, choose_providers, gpu_requested, provider_options
from service.metrics import ServiceMetrics
from service.repository import ModelRepository, VersionEntry, best_pathology_model, version_key
from service.settings import Settings
from service.stats import ModelStats

__all__ = ["ModelState", "ServedModel", "ModelVersion", "ModelServer", "open_session"]

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


def open_session(entry: VersionEntry, settings: Settings) -> OnnxModel:
    """An ONNX Runtime session for a valid version: providers from the settings, the fp16 graph on
    CUDA when the card has one and ``prefer_fp16``; warmed up when ``settings.warmup``."""
    assert entry.card is not None, entry.error
    providers = choose_providers(settings.device, settings.providers, ort.get_available_providers())
    on_gpu = providers[0] == "CUDAExecutionProvider"
    model = OnnxModel(
        entry.graph(fp16=on_gpu and settings.prefer_fp16), entry.card, provider_options(providers, settings.cuda_tf32),
        settings.intra_op_threads, settings.inter_op_threads, settings.allow_spinning,
    )
    if gpu_requested(settings.device, settings.providers) and not model.on_gpu:
        log.warning("a GPU was asked for but %s/%s runs on %s", entry.name, entry.version, model.providers)
    elif settings.device == "auto" and "CUDAExecutionProvider" in providers and not model.on_gpu:
        log.warning("CUDA is available but %s/%s fell back to %s", entry.name, entry.version, model.providers)
    if settings.warmup and model.on_gpu:
        # GPUs warm up at batch 1 and the max batch (allocation, kernel choice). CPUs do not: the
        # graph check already ran batch 1, and a first run at a new batch size cost no more than
        # the next ones (rotmnist-r4 at batch 32: 12.6 s then 13.7 s on a loaded 2-core machine)
        # while the max-batch warm-up was most of the start-up (142 s for models/, docs/serving.md).
        bs = settings.batching_for(entry.name)
        model.warmup([1, bs.max_batch_size if bs.enabled else 1])
    return model


@dataclass(frozen=True)
class ServedModel:
    """A ready version: what every route and job runs through."""

    card: ModelCard
    session: OnnxModel
    batcher: DynamicBatcher
    loop: asyncio.AbstractEventLoop = field(repr=False)
    timeout_s: float = 30.0

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    async def infer(self, images: np.ndarray, started: float | None = None) -> dict[str, np.ndarray]:
        """``images`` uint8 ``[N, H, W, C]`` through the batcher; the request timeout runs from
        ``started`` (a ``time.perf_counter()`` from when the request began; now when None)."""
        return await self.batcher.infer(images, self.timeout_s, started)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The same from a worker thread (scoring jobs), one batcher-sized part at a time, so that
        a job holds at most one batch in the queue and requests are served between its parts;
        overload and timeouts are waited out instead of failing the job."""
        step = self.batcher.max_batch
        parts = [self._run_part(images[i:i + step]) for i in range(0, len(images), step)]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run_part(self, images: np.ndarray) -> dict[str, np.ndarray]:
        while True:
            future = asyncio.run_coroutine_threadsafe(self.batcher.infer(images, self.timeout_s), self.loop)
            try:
                return future.result()
            except Overloaded as exc:
                time.sleep(min(5.0, float(exc.headers.get("Retry-After", 1))))
            except RequestTimeout:
                log.info("a job batch of %s/%s timed out in the queue; queued again", self.name, self.version)


@dataclass
class ModelVersion:
    """One version and what became of it: LOADING, then READY (``served``) or FAILED (``reason``)."""

    entry: VersionEntry
    state: ModelState = ModelState.LOADING
    reason: str = ""
    served: ServedModel | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    @property
    def card(self) -> ModelCard | None:
        return self.entry.card

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def providers(self) -> list[str]:
        return self.served.session.providers if self.served is not None else []


class ModelServer:
    """Loads every valid version of the repository in the background and serves the ready ones."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository(settings.model_dir)
        self.versions: dict[str, dict[str, ModelVersion]] = {}
        self.stats: dict[tuple[str, str], ModelStats] = {}
        self.started_at = time.time()
        self.loaded = asyncio.Event()
        self.shutting_down = False
        self._load_task: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Scan the repository now; load, warm up and start batchers in a background task."""
        self.versions = {}
        for entry in self.repository.scan():
            mv = ModelVersion(entry)
            if not entry.valid:
                mv.state, mv.reason = ModelState.FAILED, entry.error
            self.versions.setdefault(entry.name, {})[entry.version] = mv
            self.metrics.model_ready.labels(mv.name, mv.version).set(0)
        log.info("model repository %s: %d model versions", self.settings.model_dir, len(self.all()))
        wanted = self.settings.pathology_model
        if wanted and wanted not in self.versions:
            log.warning("GSA_PATHOLOGY_MODEL names '%s', which is not in the model repository (models: %s): jobs "
                        "that name no model will be refused until it is set to a served model",
                        wanted, ", ".join(sorted(self.versions)) or "none")
        self._load_task = asyncio.get_running_loop().create_task(self._load_all(), name="load-models")

    async def _load_all(self) -> None:
        t0 = time.perf_counter()
        # each model's newest version first (then the second newest, ...): they answer requests
        # that name no version, and readiness waits for one version of each model
        rank = {id(mv): i for versions in self.versions.values()
                for i, mv in enumerate(sorted(versions.values(), key=lambda mv: version_key(mv.version), reverse=True))}
        pending = sorted((mv for mv in self.all() if mv.state is ModelState.LOADING), key=lambda mv: rank[id(mv)])
        slots = asyncio.Semaphore(self.settings.load_concurrency)

        async def load(mv: ModelVersion) -> None:
            async with slots:
                try:
                    session = await asyncio.to_thread(open_session, mv.entry, self.settings)
                except Exception as exc:  # a broken model must not take the others down
                    mv.state, mv.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
                    log.error("model %s/%s failed to load: %s", mv.name, mv.version, mv.reason)
                    return
            if not self.shutting_down:
                self._serve(mv, session)

        # in waves: the older versions wait until every model's newest is loaded, so that they do
        # not take the CPU from the slowest newest version, which readiness waits for
        for wave in sorted({rank[id(mv)] for mv in pending}):
            await asyncio.gather(*(load(mv) for mv in pending if rank[id(mv)] == wave))
        self.loaded.set()
        ready = sum(mv.ready for mv in self.all())
        log.info("loaded %d of %d model versions in %.2f s", ready, len(self.all()), time.perf_counter() - t0)

    def _serve(self, mv: ModelVersion, session: OnnxModel) -> None:
        stats = self.stats[(mv.name, mv.version)] = ModelStats(mv.name, mv.version)
        batcher = DynamicBatcher(
            mv.name, mv.version, session.run, self.settings.batching_for(mv.name), stats, self.metrics,
            in_flight=lambda: self.metrics.in_flight,
        )
        self._check_limits(mv, getattr(session, "warmup_seconds_per_image", 0.0))
        batcher.start()
        assert mv.card is not None
        mv.served = ServedModel(mv.card, session, batcher, asyncio.get_running_loop(), self.settings.request_timeout_s)
        mv.state = ModelState.READY
        log.info("model %s/%s ready on %s", mv.name, mv.version, ",".join(session.providers),
                 extra={"model": mv.name, "version": mv.version, "providers": session.providers})
        self.metrics.model_ready.labels(mv.name, mv.version).set(1)
        for i, provider in enumerate(session.providers):
            self.metrics.provider_info.labels(mv.name, mv.version, provider).set(1 if i == 0 else 0)

    def _check_limits(self, mv: ModelVersion, seconds_per_image: float) -> None:
        """Warn when, at the warm-up's speed, a maximal request cannot finish within the timeout."""
        s = self.settings
        workers = s.batching_for(mv.name).workers
        worst_s = s.max_images_per_request * seconds_per_image / workers
        if worst_s > s.request_timeout_s:
            log.warning(
                "model %s/%s: a request of %d images (GSA_MAX_IMAGES_PER_REQUEST) would take about %.1f s at the "
                "warm-up's %.1f ms per image, over GSA_REQUEST_TIMEOUT_S=%g; such requests will be refused",
                mv.name, mv.version, s.max_images_per_request, worst_s, seconds_per_image * 1000, s.request_timeout_s,
                extra={"model": mv.name, "version": mv.version},
            )

    async def stop(self) -> None:
        """Stop loading, let every batcher finish what it holds, release the sessions."""
        self.shutting_down = True
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            try:
                await self._load_task
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*(mv.served.batcher.close() for mv in self.all() if mv.served is not None))
        for mv in self.all():
            if mv.ready:
                mv.state, mv.served = ModelState.UNLOADED, None
        log.info("all models unloaded")

    # ---- state --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every model can serve with its final default version: the newest one that did not fail
        is loaded (older versions may still load, answering 503 until they are ready). When
        strict: every version has loaded and is ready. False while shutting down."""
        if self._load_task is None or self.shutting_down:
            return False
        if self.settings.strict_readiness:
            return self.loaded.is_set() and all(mv.ready for mv in self.all())
        return all(self._default_settled(versions) for versions in self.versions.values())

    @staticmethod
    def _default_settled(versions: dict[str, ModelVersion]) -> bool:
        """Whether the version that answers requests naming none is final: the newest version
        that did not fail is ready (an older one finishing first does not count)."""
        for mv in sorted(versions.values(), key=lambda mv: version_key(mv.version), reverse=True):
            if mv.state is ModelState.LOADING:
                return False
            if mv.ready:
                return True
        return True  # every version failed: nothing to wait for

    @property
    def loading(self) -> bool:
        """Whether a version is still loading."""
        return any(mv.state is ModelState.LOADING for mv in self.all())

    def all(self) -> list[ModelVersion]:
        return [mv for versions in self.versions.values() for mv in versions.values()]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model to run: raises NotFound for unknown names, Unavailable (503) while it loads,
        ModelNotReady (400) when it failed or was unloaded."""
        mv = self.find(name, version)
        if mv.state is ModelState.LOADING:  # transient: come back shortly
            raise Unavailable(f"model '{name}' version '{mv.version}' is not ready yet (LOADING)", {"Retry-After": "1"})
        if mv.served is None:
            detail = f": {mv.reason}" if mv.reason else ""
            raise ModelNotReady(f"model '{name}' version '{mv.version}' is not ready ({mv.state.value}{detail})")
        return mv.served

    def find(self, name: str, version: str | None = None) -> ModelVersion:
        """A version whatever its state (metadata and readiness of broken models)."""
        versions = self.versions.get(name)
        if not versions:
            known = f" (models: {', '.join(self.versions)})" if self.versions else " (no models are served)"
            raise NotFound(f"unknown model '{name}'" + known)
        if version is None:
            return self.default(name)
        if version not in versions:
            raise NotFound(f"model '{name}' has no version '{version}' (versions: {', '.join(versions)})")
        return versions[version]

    def best_pathology_model(self) -> str | None:
        """The name of the ready pathology model (RGB, with an mpp) whose default version's card
        reports the highest validation accuracy; None when no such model is served."""
        return best_pathology_model(mv.card for mv in self.all()
                                    if mv.ready and mv.card is not None and mv is self.default(mv.name))

    def default(self, name: str) -> ModelVersion:
        """Newest ready version; the newest of all when none is ready (to report why)."""
        ordered = sorted(self.versions[name].values(), key=lambda mv: version_key(mv.version))
        ready = [mv for mv in ordered if mv.ready]
        return (ready or ordered)[-1]
