"""Scoring jobs (slides, patch sets and slide archives) run by worker threads, with their state in a
SQLite store (no FastAPI).

Layout under the jobs directory: ``jobs.sqlite3`` (every job's state, shared by the service
processes that use this directory), ``<id>/input/`` (an uploaded file), ``<id>/checkpoint/`` (the
scored items of a running job, saved every ``checkpoint_every`` items) and ``<id>/results/`` (the
result files; for an archive, one folder per slide and ``summary.json``). A job whose worker is
gone (a stop, a crash, SIGKILL) is queued again and resumes from its checkpoint (an archive: from
the slides already sealed), or is marked failed when resuming is off or its input is gone.

An archive job runs ``score_archive``: in this process with the served model, or, with a Ray
address, on a pool of Ray actors (Ray is imported only then).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from service.distributed.archive import SUMMARY_FILE, ArchiveItem, list_archive, result_files, score_archive
from service.errors import BadRequest, Conflict, Forbidden, NotFound, Overloaded, ServiceError, Unavailable
from service.job_store import Job, JobState, JobStore, Page
from service.scoring.checkpoint import Checkpoint
from service.scoring.outputs import write_json
from service.scoring.patch_scoring import PATCH_RESULTS, PatchOptions, score_patches
from service.scoring.pipeline import ScoringModel
from service.scoring.scoring_errors import BadParameter, Cancelled, ScoringError
from service.scoring.slide_scoring import SLIDE_RESULTS, SlideOptions, score_slide

__all__ = ["JobState", "Job", "JobManager", "RESULT_MEDIA_TYPES"]

log = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{32}$")
RESULT_MEDIA_TYPES = {
    ".csv": "text/csv", ".geojson": "application/geo+json", ".json": "application/json",
    ".npy": "application/octet-stream", ".png": "image/png",
}
# kind -> (options, engine, result files); an archive's results are listed when it finishes
KINDS = {"slide": (SlideOptions, score_slide, SLIDE_RESULTS), "patches": (PatchOptions, score_patches, PATCH_RESULTS),
         "archive": (SlideOptions, score_archive, ())}
ModelResolver = Callable[[str, "str | None"], ScoringModel]
TileCounter = Callable[[str, int], None]
_HOST = socket.gethostname()


def _input_exists(job: Job) -> bool:
    """Whether a job's input is still there (an archive's glob pattern is looked at when it runs)."""
    return Path(job.source).exists() or (job.kind == "archive" and glob.has_magic(job.source))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobManager:
    """Queues jobs, runs at most ``max_concurrent`` at once in this process, and keeps their state in
    the store.

    Args:
        root: the jobs directory (created at start).
        resolve_model: ``(name, version) -> model``; may raise :class:`Unavailable` while models load.
        max_concurrent: jobs running at once (worker threads).
        max_queued: jobs waiting; beyond it submissions get 429.
        resume: re-run jobs whose worker is gone (else they are marked failed).
        data_dir: the data directory: paths under it are shown relative to it.
        checkpoint_every: items (tiles, patches) between two checkpoints of a running job.
        lease_s: a running job whose worker (on another host) has not been heard of for this long is
            taken over.
        poll_s: how often idle workers look for jobs other processes queued.
        on_tiles: ``(kind, count)`` for every batch of items scored (metrics).
        model_dir: the model repository (archive jobs on Ray: every actor loads its model from it).
        ray_address: where archive jobs run: None in this process; else a Ray cluster (``local``,
            ``127.0.0.1:6379``, ``auto``, ``ray://host:10001``).
        ray_workers: Ray actors of an archive job (one model session each).
        ray_threads: ONNX Runtime threads (and Ray CPUs) of each actor.
        ray_start_timeout_s: an archive job on Ray fails when its actors have not started by then.
    """

    def __init__(self, root: Path, resolve_model: ModelResolver, max_concurrent: int = 1, max_queued: int = 100,
                 resume: bool = True, data_dir: Path | None = None, checkpoint_every: int = 256,
                 lease_s: float = 60.0, poll_s: float = 1.0, on_tiles: TileCounter | None = None,
                 model_dir: Path | None = None, ray_address: str | None = None, ray_workers: int = 1,
                 ray_threads: int = 1, ray_start_timeout_s: float = 300.0):
        self.root = Path(root)
        self.store = JobStore(self.root)
        self.resolve_model = resolve_model
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.resume = resume
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.on_tiles = on_tiles
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.ray_address = ray_address
        self.ray_workers = ray_workers
        self.ray_threads = ray_threads
        self.ray_start_timeout_s = ray_start_timeout_s
        self.worker_id = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[str, threading.Event] = {}  # jobs this process runs -> their cancel event
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Open (or migrate) the store, import job files of the older layout, take over the jobs
        whose worker is gone, start the workers."""
        self.store.open()
        imported = self.store.import_files()
        if imported:
            log.info("imported %d job.json files into %s", imported, self.store.path.name)
        self._recover()
        for i in range(self.max_concurrent):
            t = threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._housekeep, name="job-housekeeper", daemon=True)
        t.start()
        self._threads.append(t)

    def _is_orphan(self, worker: str | None, heartbeat: float | None) -> bool:
        """A running job's worker is gone: none left (a stop), a dead process on this host, or no
        heartbeat for ``lease_s``."""
        if worker is None:
            return True
        if worker == self.worker_id:
            return False
        host, _, pid = worker.partition(":")
        pid = pid.partition(":")[0]
        if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
            return True
        return heartbeat is None or time.time() - heartbeat > self.lease_s

    def _recover(self) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def fix(job: Job) -> None:
            if not self.resume:
                job.state, job.finished_at = JobState.FAILED, time.time()
                job.error = "interrupted by a service restart (resuming jobs is off)"
            elif not _input_exists(job):
                job.state, job.finished_at = JobState.FAILED, time.time()
                job.error = f"interrupted by a service restart, and its input {job.input['path']} is gone"
            else:
                job.state = JobState.QUEUED
                job.notes.append(f"interrupted by a service restart at {stamp}; resumes from its last checkpoint")

        for job in self.store.recover(self._is_orphan, fix):
            log.info("job %s %s after its worker stopped", job.id, job.state.value)
            self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the workers; a running job is interrupted and left ``running`` (without a worker) in the
        store, to be resumed by the next start."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            for event in self._running.values():
                event.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- submissions and lookups -----------------------------------------------------------
    def new_id(self) -> str:
        return uuid.uuid4().hex

    def input_dir(self, job_id: str) -> Path:
        return self.root / job_id / "input"

    def shown_path(self, path: Path, uploaded: bool) -> str:
        """How responses name a server path: relative to the data directory, or the upload's file name."""
        if not uploaded and self.data_dir is not None and path.is_relative_to(self.data_dir):
            return str(path.relative_to(self.data_dir)) or "."
        return path.name

    def submit(self, kind: str, model: str, version: str | None, input_path: Path, uploaded: bool,
               options: dict[str, Any], job_id: str | None = None, owner: str | None = None) -> Job:
        """Queue a job; raises BadRequest for bad options, Overloaded when the queue is full."""
        if kind not in KINDS:
            raise BadRequest(f"unknown job kind {kind!r}")
        try:
            KINDS[kind][0].from_dict(options)
        except (BadParameter, TypeError) as exc:
            raise BadRequest(f"invalid options: {exc}") from None
        job = Job(job_id or self.new_id(), kind, model, version,
                  {"path": self.shown_path(input_path, uploaded), "uploaded": uploaded, "name": input_path.name},
                  dict(options), owner=owner, source=str(input_path))
        (self.root / job.id).mkdir(parents=True, exist_ok=True)
        if not self.store.insert(job, self.max_queued):
            raise Overloaded(f"jobs are waiting up to the limit of {self.max_queued}; try again later", 30)
        self._wake.set()
        log.info("job %s queued: %s %s on %s", job.id, kind, job.input["path"], model)
        return job

    def archive_items(self, source: Path) -> list[ArchiveItem]:
        """The slides of an archive input (a folder, glob pattern or CSV manifest; see ``list_archive``),
        each of which must resolve inside the data directory: BadRequest when there is none to
        score, Forbidden for a slide elsewhere (a symlink, a manifest naming ``../`` or an absolute
        path)."""
        try:
            items = list_archive(source)
        except ScoringError as exc:
            raise BadRequest(self._scrub(str(exc))) from None
        if self.data_dir is not None:
            outside = [item for item in items if not item.path.resolve().is_relative_to(self.data_dir)]
            if outside:
                first = self._scrub(str(outside[0].path))
                raise Forbidden(f"{len(outside)} slide(s) of the archive resolve outside the data directory, the "
                                f"first: {first!r}; every slide must be inside GSA_DATA_DIR")
        return items

    def get(self, job_id: str, principal: str | None = None) -> Job:
        """The job; 404 for another principal's job (so that ids cannot be probed)."""
        job = self.store.get(job_id) if _ID.match(job_id) else None
        if job is None or (principal is not None and job.owner != principal):
            raise NotFound(f"no job '{job_id}'")
        return job

    def list(self, limit: int = 50, cursor: str | None = None, offset: int = 0, principal: str | None = None,
             state: str | None = None, newest_first: bool = False) -> Page:
        """A page of jobs, oldest (or newest) first (only the principal's when there is one)."""
        try:
            return self.store.page(limit, cursor, offset, principal, state, newest_first)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def queued(self) -> int:
        return self.store.counts()[JobState.QUEUED.value]

    def cancel(self, job_id: str, principal: str | None = None) -> Job:
        """Cancel a queued or running job (a running one stops at its next batch, in whichever process
        runs it)."""
        self.get(job_id, principal)

        def cancel_queued(job: Job) -> None:
            job.state, job.error, job.finished_at = JobState.CANCELLED, "cancelled before it started", time.time()

        job = self.store.request_cancel(job_id, cancel_queued)
        if job is None:
            raise NotFound(f"no job '{job_id}'")
        with self._lock:
            if job.id in self._running:
                self._running[job.id].set()
        return job

    def delete(self, job_id: str, principal: str | None = None) -> None:
        """Forget a finished job and remove its files."""
        job = self.get(job_id, principal)
        if not job.state.finished:
            raise Conflict(f"job '{job_id}' is {job.state.value}; cancel it first")
        self.store.delete(job.id)
        shutil.rmtree(self.root / job.id, ignore_errors=True)

    def result_path(self, job_id: str, name: str, principal: str | None = None) -> Path:
        job = self.get(job_id, principal)
        if job.state is not JobState.SUCCEEDED:
            raise Conflict(f"job '{job_id}' is {job.state.value}; results exist once it has succeeded")
        if name not in job.results:
            raise NotFound(f"job '{job_id}' has no result '{name}' (results: {', '.join(job.results)})")
        return self.root / job.id / "results" / name

    # ---- running ------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim(self.worker_id, self._begin)
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._run(job)

    def _housekeep(self) -> None:
        """Heartbeats of this process's running jobs, cancels asked of them by other processes, and
        jobs whose worker died."""
        while not self._stopping.wait(min(self.poll_s * 2, self.lease_s / 4)):
            try:
                with self._lock:
                    running = list(self._running)
                for job_id in self.store.heartbeat(running, self.worker_id):
                    with self._lock:
                        if job_id in self._running:
                            self._running[job_id].set()
                self._recover()
            except Exception:  # the store is busy or gone: try again at the next round
                log.exception("job housekeeping failed")

    @staticmethod
    def _begin(job: Job) -> None:
        job.state, job.started_at, job.attempts, job.error = JobState.RUNNING, time.time(), job.attempts + 1, None

    def _run(self, job: Job) -> None:
        cancel = threading.Event()
        with self._lock:
            self._running[job.id] = cancel
        try:
            self._execute(job, cancel)
        finally:
            with self._lock:
                self._running.pop(job.id, None)

    def _execute(self, job: Job, cancel: threading.Event) -> None:
        checkpoint = Checkpoint(self.root / job.id / "checkpoint", self.checkpoint_every)
        out = self.root / job.id / "results"
        try:
            if job.kind == "archive":
                results = self._score_archive(job, cancel, out)
            else:
                results = self._score(job, cancel, out, checkpoint)
        except Cancelled:
            if self._stopping.is_set():
                log.info("job %s interrupted by shutdown; it resumes on the next start", job.id)
                self.store.save(job, None, heartbeat=True)  # stays "running", without a worker
            else:
                checkpoint.clear()
                self._finish(job, JobState.CANCELLED, "cancelled while running")
            return
        except (ScoringError, ServiceError) as exc:
            self._finish(job, JobState.FAILED, str(exc))
            return
        except Exception as exc:  # a bug must fail this job, not the worker
            log.exception("job %s failed", job.id)
            self._finish(job, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            return
        checkpoint.clear()
        job.results = results
        self._finish(job, JobState.SUCCEEDED)

    def _score(self, job: Job, cancel: threading.Event, out: Path, checkpoint: Checkpoint) -> list[str]:
        """A slide or a patch set, checkpointed as it goes; the result files."""
        _, score, _ = KINDS[job.kind]
        options = KINDS[job.kind][0].from_dict(self._runtime_options(job))
        last_save = [0.0]
        first = [True]

        def progress(done: int, total: int) -> None:
            if first[0]:
                first[0] = False
                job.resumed_from = checkpoint.resumed_from
            elif self.on_tiles is not None:
                self.on_tiles(job.kind, done - job.done)
            job.done, job.total = done, total
            if time.monotonic() - last_save[0] > 1.0 or checkpoint.saved == done:
                last_save[0] = time.monotonic()
                if self.store.save(job, self.worker_id, heartbeat=True):
                    cancel.set()

        model = self._model_for(job, cancel)
        meta = score(model, job.source, out, options, progress=progress, cancel=cancel, checkpoint=checkpoint,
                     source_name=job.input["path"])
        return list(meta["results"])

    def _score_archive(self, job: Job, cancel: threading.Event, out: Path) -> list[str]:
        """Every slide of an archive into ``out/<name>/`` and ``out/summary.json``; slides sealed by an
        earlier attempt are skipped. Progress counts slides (``tiles``: tiles scored by this attempt).
        Failed slides are listed in the summary and the notes; only a run where none succeeded fails."""
        if self.model_dir is None:
            raise ScoringError("archive jobs need the model repository's path (model_dir)")
        options = SlideOptions.from_dict(self._runtime_options(job))
        items = self.archive_items(Path(job.source))
        model = self._model_for(job, cancel)
        job.done, job.total, job.tiles = 0, len(items), 0
        if self.store.save(job, self.worker_id, heartbeat=True):  # the slide count, shown from the start
            cancel.set()

        def progress(record: dict[str, Any], done: int, pending: int) -> None:
            job.resumed_from = len(items) - pending
            job.done = job.resumed_from + done
            job.tiles += record.get("tiles", 0)
            if self.on_tiles is not None and record.get("tiles"):
                self.on_tiles(job.kind, record["tiles"])
            if self.store.save(job, self.worker_id, heartbeat=True):
                cancel.set()

        summary = score_archive(
            items, out, model_dir=self.model_dir, model=job.model, version=job.model_version, options=options,
            ray_address=self.ray_address, workers=self.ray_workers, threads=self.ray_threads, progress=progress,
            session=model if self.ray_address is None else None, cancel=cancel,
            start_timeout_s=self.ray_start_timeout_s)
        summary = self._scrub_json(summary)  # the slides named relative to the data directory, as elsewhere
        write_json(out / SUMMARY_FILE, summary)
        job.resumed_from, job.done = summary["skipped"], summary["slides"]
        failed = summary["failed"]
        if failed and summary["done"] + summary["skipped"] == 0:
            raise ScoringError(f"every slide failed ({len(failed)}); the first: {failed[0]['name']}: "
                               f"{failed[0]['error']}")
        if failed:
            job.notes.append(f"{len(failed)} of {summary['slides']} slides failed (see summary.json): "
                             + "; ".join(f"{f['name']}: {f['error']}" for f in failed[:3])
                             + (" ..." if len(failed) > 3 else ""))
        return result_files(out, items)

    def _runtime_options(self, job: Job) -> dict[str, Any]:
        """Options as the engine takes them: a labels file named relative to the data directory made absolute."""
        options = dict(job.options)
        if options.get("labels_path") and self.data_dir is not None:
            options["labels_path"] = str(self.data_dir / options["labels_path"])
        return options

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
        job.state, job.error, job.finished_at = state, self._scrub(error), time.time()
        self.store.save(job, None, heartbeat=True)
        level = logging.WARNING if state is JobState.FAILED else logging.INFO
        log.log(level, "job %s %s%s", job.id, state.value, f": {job.error}" if job.error else "")

    def _scrub_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub_json(v) for v in value]
        return value

    def _scrub(self, text: str | None) -> str | None:
        """No absolute server path in a message: the data and jobs directories are cut off."""
        if text is None:
            return None
        for root in (self.data_dir, self.root.resolve()):
            if root is not None:
                text = text.replace(str(root) + os.sep, "").replace(str(root), ".")
        return text
