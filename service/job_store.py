"""Job state in SQLite: one database file (``jobs.sqlite3`` in the jobs directory, WAL journal) that
several service processes may share (no FastAPI).

Queried fields are columns (state, owner, creation time, the worker running a job, its heartbeat, a
cancel request); the rest of a job is a JSON document. The schema is versioned with
``PRAGMA user_version`` and migrated at open. Claiming a queued job is one ``BEGIN IMMEDIATE``
transaction, so only one process runs it.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["JobState", "Job", "JobStore", "Page", "DB_FILE"]

log = logging.getLogger(__name__)

DB_FILE = "jobs.sqlite3"
# (version, statements): applied in order to a database whose user_version is lower
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            owner TEXT,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            worker TEXT,
            heartbeat REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_by_time ON jobs (created_at, id)",
        "CREATE INDEX jobs_by_state ON jobs (state, created_at, id)",
        "CREATE INDEX jobs_by_owner ON jobs (owner, created_at, id)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


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
    input: dict[str, Any]  # {"path": relative to the data directory (or the upload's name), "uploaded", "name"}
    options: dict[str, Any]
    state: JobState = JobState.QUEUED
    done: int = 0
    total: int | None = None
    resumed_from: int = 0  # items restored from the checkpoint at this attempt's start (archives: slides sealed)
    tiles: int | None = None  # archives (whose done and total count slides): tiles scored by this attempt
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    model_version: str | None = None
    results: list[str] = field(default_factory=list)
    owner: str | None = None  # the principal that submitted it (None with auth off)
    source: str = ""  # the input's absolute path on the server: never shown

    def as_dict(self) -> dict[str, Any]:
        """The public view (no server paths)."""
        data = asdict(self)
        data.pop("source")
        data["state"] = self.state.value
        data["progress"] = {"done": self.done, "total": self.total, "resumed_from": data.pop("resumed_from"),
                            "fraction": (self.done / self.total) if self.total else None, "tiles": data.pop("tiles")}
        return data

    def to_record(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        return json.dumps(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["state"] = JobState(data["state"])
        return cls(**data)


@dataclass
class Page:
    jobs: list[Job]
    next: str | None  # cursor of the page after this one


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at!r}|{job.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = text.split("|", 1)
        return float(created), job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


class JobStore:
    """The jobs table of ``<root>/jobs.sqlite3``; every method is one short transaction.

    Args:
        root: the jobs directory (created).
        busy_timeout_s: how long a writer waits for another process's lock.
    """

    def __init__(self, root: Path, busy_timeout_s: float = 10.0):
        self.root = Path(root)
        self.path = self.root / DB_FILE
        self.busy_timeout_s = busy_timeout_s

    def open(self) -> None:
        """Create or migrate the database."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            current = con.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                con.execute("ROLLBACK")
                raise RuntimeError(f"{DB_FILE} has schema version {current}, "
                                   f"newer than this service's {SCHEMA_VERSION}")
            for version, statements in MIGRATIONS:
                if version > current:
                    for sql in statements:
                        con.execute(sql)
                    con.execute(f"PRAGMA user_version = {version}")
                    log.info("job store migrated to schema version %d", version)
            con.execute("COMMIT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            yield con
        finally:
            con.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken at once (``BEGIN IMMEDIATE``), committed or rolled back."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---- rows ------------------------------------------------------------------------------
    def insert(self, job: Job, max_queued: int | None = None) -> bool:
        """Add a job; False (nothing added) when ``max_queued`` jobs already wait."""
        with self._tx() as con:
            if max_queued is not None:
                queued = con.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    return False
            con.execute("INSERT INTO jobs (id, kind, owner, state, created_at, data) VALUES (?, ?, ?, ?, ?, ?)",
                        (job.id, job.kind, job.owner, job.state.value, job.created_at, job.to_record()))
        return True

    def save(self, job: Job, worker: str | None = None, heartbeat: bool = False) -> bool:
        """Write the job's document and state; returns whether a cancel was requested."""
        with self._tx() as con:
            if heartbeat:
                con.execute("UPDATE jobs SET state = ?, data = ?, worker = ?, heartbeat = ? WHERE id = ?",
                            (job.state.value, job.to_record(), worker, time.time(), job.id))
            else:
                con.execute("UPDATE jobs SET state = ?, data = ? WHERE id = ?",
                            (job.state.value, job.to_record(), job.id))
            row = con.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return bool(row and row[0])

    def get(self, job_id: str) -> Job | None:
        with self._connect() as con:
            row = con.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_dict(json.loads(row[0])) if row else None

    def delete(self, job_id: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def page(self, limit: int, cursor: str | None = None, offset: int = 0, owner: str | None = None,
             state: str | None = None, newest_first: bool = False) -> Page:
        """Jobs oldest (or newest) first, ``limit`` of them after ``cursor`` (or skipping ``offset``);
        only the ``owner``'s when one is given, only those in ``state`` when given."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if cursor is not None:
            created, job_id = _decode_cursor(cursor)
            op = "<" if newest_first else ">"
            where.append(f"(created_at {op} ? OR (created_at = ? AND id {op} ?))")
            args += [created, created, job_id]
        sql = "SELECT data FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC" if newest_first else " ORDER BY created_at, id"
        sql += " LIMIT ? OFFSET ?"
        with self._connect() as con:
            rows = con.execute(sql, (*args, limit + 1, offset if cursor is None else 0)).fetchall()
        jobs = [Job.from_dict(json.loads(r[0])) for r in rows]
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return Page(jobs, _encode_cursor(jobs[-1]) if more and jobs else None)

    def counts(self) -> dict[str, int]:
        """Jobs by state (every state present, 0 when none)."""
        with self._connect() as con:
            rows = con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = {s.value: 0 for s in JobState}
        counts.update({state: n for state, n in rows})
        return counts

    # ---- running ---------------------------------------------------------------------------
    def claim(self, worker: str, start: Callable[[Job], None]) -> Job | None:
        """Take the oldest queued job for ``worker``: ``start`` edits it (state running) inside the
        transaction that marks it, so two processes never take the same job."""
        with self._tx() as con:
            row = con.execute("SELECT data FROM jobs WHERE state = 'queued' ORDER BY created_at, id LIMIT 1").fetchone()
            if row is None:
                return None
            job = Job.from_dict(json.loads(row[0]))
            start(job)
            con.execute("UPDATE jobs SET state = ?, data = ?, worker = ?, heartbeat = ?, cancel_requested = 0 "
                        "WHERE id = ?", (job.state.value, job.to_record(), worker, time.time(), job.id))
        return job

    def request_cancel(self, job_id: str, cancel_queued: Callable[[Job], None]) -> Job | None:
        """Cancel a queued job at once (``cancel_queued`` edits it); flag a running one for its worker."""
        with self._tx() as con:
            row = con.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_dict(json.loads(row[0]))
            if job.state is JobState.QUEUED:
                cancel_queued(job)
                con.execute("UPDATE jobs SET state = ?, data = ? WHERE id = ?",
                            (job.state.value, job.to_record(), job.id))
            elif job.state is JobState.RUNNING:
                con.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
        return job

    def heartbeat(self, job_ids: list[str], worker: str) -> set[str]:
        """Mark ``worker``'s running jobs alive; the ids among them whose cancel was requested."""
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        with self._tx() as con:
            con.execute(f"UPDATE jobs SET heartbeat = ? WHERE worker = ? AND id IN ({marks})",
                        (time.time(), worker, *job_ids))
            rows = con.execute(f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})",
                               job_ids).fetchall()
        return {r[0] for r in rows}

    def recover(self, is_orphan: Callable[[str | None, float | None], bool], fix: Callable[[Job], None]) -> list[Job]:
        """Running jobs whose worker is gone (``is_orphan(worker, heartbeat)``): ``fix`` requeues or
        fails each, in one transaction."""
        fixed = []
        with self._tx() as con:
            rows = con.execute("SELECT data, worker, heartbeat FROM jobs WHERE state = 'running'").fetchall()
            for data, worker, beat in rows:
                if not is_orphan(worker, beat):
                    continue
                job = Job.from_dict(json.loads(data))
                fix(job)
                con.execute("UPDATE jobs SET state = ?, data = ?, worker = NULL, heartbeat = NULL WHERE id = ?",
                            (job.state.value, job.to_record(), job.id))
                fixed.append(job)
        return fixed

    def import_files(self) -> int:
        """Import the ``<id>/job.json`` files of the file-per-job layout once (renamed ``job.json.imported``)."""
        count = 0
        for path in sorted(self.root.glob("*/job.json")):
            try:
                job = Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.error("ignoring unreadable job file %s/%s: %s", path.parent.name, path.name, exc)
                continue
            if not job.source:
                job.source = str(job.input.get("path", ""))
                job.input = {**job.input, "path": job.input.get("name", Path(job.source).name)}
            with self._tx() as con:
                con.execute("INSERT OR IGNORE INTO jobs (id, kind, owner, state, created_at, worker, data) "
                            "VALUES (?, ?, ?, ?, ?, NULL, ?)",
                            (job.id, job.kind, job.owner, job.state.value, job.created_at, job.to_record()))
            path.rename(path.with_name("job.json.imported"))
            count += 1
        return count
