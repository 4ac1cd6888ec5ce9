"""Scoring jobs (slides and patch sets) run by worker threads, with their state on disk (no FastAPI).

Layout under the jobs directory: ``<id>/job.json`` (the state, rewritten atomically),
``<id>/input/`` (an uploaded file) and ``<id>/results/`` (the result files). A service that starts
and finds a job still ``running`` (it stopped or crashed mid-job) runs it again from the start, or
marks it failed when resuming is off or its input is gone.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from service.errors import BadRequest, Conflict, NotFound, Overloaded, ServiceError, Unavailable
from service.scoring.scoring_errors import BadParameter, Cancelled, ScoringError
from service.scoring.patch_scoring import PATCH_RESULTS, PatchOptions, score_patches
from service.scoring.pipeline import ScoringModel
from service.scoring.slide_scoring import SLIDE_RESULTS, SlideOptions, score_slide

__all__ = ["JobState", "Job", "JobManager", "RESULT_MEDIA_TYPES"]

log = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{32}$")
RESULT_MEDIA_TYPES = {
    ".csv": "text/csv", ".geojson": "application/geo+json", ".json": "application/json",
    ".npy": "application/octet-stream", ".png": "image/png",
}
KINDS = {"slide": (SlideOptions, score_slide, SLIDE_RESULTS), "patches": (PatchOptions, score_patches, PATCH_RESULTS)}
ModelResolver = Callable[[str, "str | None"], ScoringModel]


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    id: str
    kind: str
    model: str
    version: str | None
    input: dict[str, Any]  # {"path": ..., "uploaded": bool, "name": ...}
    options: dict[str, Any]
    state: JobState = JobState.QUEUED
    done: int = 0
    total: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    model_version: str | None = None
    results: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["progress"] = {"done": self.done, "total": self.total,
                            "fraction": (self.done / self.total) if self.total else None}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["state"] = JobState(data["state"])
        return cls(**data)


class JobManager:
    """Queues jobs, runs at most ``max_concurrent`` at once, and keeps their state on disk.

    Args:
        root: the jobs directory (created on the first job).
        resolve_model: ``(name, version) -> model``; may raise :class:`Unavailable` while models load.
        max_concurrent: jobs running at once (worker threads).
        max_queued: jobs waiting; beyond it submissions get 429.
        resume: re-run jobs found ``running`` at start (else they are marked failed).
    """

    def __init__(self, root: Path, resolve_model: ModelResolver, max_concurrent: int = 1, max_queued: int = 100,
                 resume: bool = True):
        self.root = Path(root)
        self.resolve_model = resolve_model
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.resume = resume
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Load the jobs on disk, requeue unfinished ones, start the workers."""
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/job.json"), key=lambda p: p.stat().st_mtime):
                self._recover(path)
        for i in range(self.max_concurrent):
            t = threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _recover(self, path: Path) -> None:
        try:
            job = Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("ignoring unreadable job file %s: %s", path, exc)
            return
        self.jobs[job.id] = job
        if job.state is JobState.RUNNING:
            if not self.resume:
                self._finish(job, JobState.FAILED, "interrupted by a service restart (resuming jobs is off)")
                return
            if not Path(job.input["path"]).exists():
                self._finish(job, JobState.FAILED, f"interrupted by a service restart, and its input {job.input['path']} is gone")
                return
            job.state, job.done = JobState.QUEUED, 0
            job.notes.append(f"interrupted by a service restart at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; run again")
            self._save(job)
        if job.state is JobState.QUEUED:
            self._cancel[job.id] = threading.Event()
            self._queue.put(job.id)
            log.info("job %s requeued after a restart", job.id)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the workers; a running job is interrupted and left ``running`` on disk, to be resumed
        by the next start."""
        self._stopping.set()
        with self._lock:
            for event in self._cancel.values():
                event.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- submissions and lookups -----------------------------------------------------------
    def new_id(self) -> str:
        return uuid.uuid4().hex

    def input_dir(self, job_id: str) -> Path:
        return self.root / job_id / "input"

    def submit(self, kind: str, model: str, version: str | None, input_path: Path, uploaded: bool,
               options: dict[str, Any], job_id: str | None = None) -> Job:
        """Queue a job; raises BadRequest for bad options, Overloaded when the queue is full."""
        if kind not in KINDS:
            raise BadRequest(f"unknown job kind {kind!r}")
        try:
            KINDS[kind][0].from_dict(options)
        except (BadParameter, TypeError) as exc:
            raise BadRequest(f"invalid options: {exc}") from None
        with self._lock:
            queued = sum(j.state is JobState.QUEUED for j in self.jobs.values())
            if queued >= self.max_queued:
                raise Overloaded(f"{queued} jobs are waiting (the limit is {self.max_queued}); try again later", 30)
            job = Job(job_id or self.new_id(), kind, model, version,
                      {"path": str(input_path), "uploaded": uploaded, "name": input_path.name}, dict(options))
            (self.root / job.id).mkdir(parents=True, exist_ok=True)
            self.jobs[job.id] = job
            self._cancel[job.id] = threading.Event()
            self._save(job)
        self._queue.put(job.id)
        log.info("job %s queued: %s %s with %s", job.id, kind, input_path.name, model)
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if _ID.match(job_id) else None
        if job is None:
            raise NotFound(f"no job '{job_id}'")
        return job

    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created_at)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (a running one stops at its next batch)."""
        job = self.get(job_id)
        with self._lock:
            if job.state is JobState.QUEUED:
                self._finish(job, JobState.CANCELLED, "cancelled before it started")
            elif job.state is JobState.RUNNING:
                self._cancel[job.id].set()
        return job

    def delete(self, job_id: str) -> None:
        """Forget a finished job and remove its files."""
        job = self.get(job_id)
        if not job.state.finished:
            raise Conflict(f"job '{job_id}' is {job.state.value}; cancel it first")
        with self._lock:
            self.jobs.pop(job.id, None)
            self._cancel.pop(job.id, None)
        shutil.rmtree(self.root / job.id, ignore_errors=True)

    def result_path(self, job_id: str, name: str) -> Path:
        job = self.get(job_id)
        if job.state is not JobState.SUCCEEDED:
            raise Conflict(f"job '{job_id}' is {job.state.value}; results exist once it has succeeded")
        if name not in job.results:
            raise NotFound(f"job '{job_id}' has no result '{name}' (results: {', '.join(job.results)})")
        return self.root / job.id / "results" / name

    # ---- running ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            job = self.jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED:
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        cancel = self._cancel.setdefault(job.id, threading.Event())
        with self._lock:
            if job.state is not JobState.QUEUED:
                return
            job.state, job.started_at, job.attempts, job.error = JobState.RUNNING, time.time(), job.attempts + 1, None
            self._save(job)
        _, score, _ = KINDS[job.kind]
        options = KINDS[job.kind][0].from_dict(job.options)
        last_save = [0.0]

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if time.monotonic() - last_save[0] > 1.0:
                last_save[0] = time.monotonic()
                self._save(job)

        out = self.root / job.id / "results"
        try:
            model = self._model_for(job, cancel)
            meta = score(model, job.input["path"], out, options, progress=progress, cancel=cancel)
        except Cancelled:
            if self._stopping.is_set():
                log.info("job %s interrupted by shutdown; it resumes on the next start", job.id)
                self._save(job)  # stays "running" on disk
            else:
                self._finish(job, JobState.CANCELLED, "cancelled while running")
            return
        except (ScoringError, ServiceError) as exc:
            self._finish(job, JobState.FAILED, str(exc))
            return
        except Exception as exc:  # a bug must fail this job, not the worker
            log.exception("job %s failed", job.id)
            self._finish(job, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            return
        job.results = list(meta["results"])
        self._finish(job, JobState.SUCCEEDED)

    def _model_for(self, job: Job, cancel: threading.Event) -> ScoringModel:
        """The model, waiting while the service is still loading it."""
        while True:
            try:
                model = self.resolve_model(job.model, job.version)
                job.model_version = model.card.version
                return model
            except Unavailable:
                if cancel.wait(0.5):
                    raise Cancelled("cancelled") from None

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        with self._lock:
            job.state, job.error, job.finished_at = state, error, time.time()
            self._save(job)
        level = logging.WARNING if state is JobState.FAILED else logging.INFO
        log.log(level, "job %s %s%s", job.id, state.value, f": {error}" if error else "")

    def _save(self, job: Job) -> None:
        folder = self.root / job.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".job.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(job.as_dict(), indent=2), encoding="utf-8")
        os.replace(tmp, folder / "job.json")
