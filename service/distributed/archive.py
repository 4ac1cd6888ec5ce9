"""Score a slide archive: many slides, one output folder each, on a Ray cluster or in this process.

Each slide is scored by ``score_slide`` (the single-machine engine), so its files are the same
byte for byte. On Ray a pool of actors does the work: each actor opens one ONNX Runtime session at
start and reuses it for every slide it is given, and reads its slides itself (the slides, the
model repository and the output folder must be visible to every node at the same path: a shared
file system, as for any slide archive). The driver only hands out slide paths and gathers the
short per-slide records.

A slide that fails (unreadable file, no tissue, a worker that died) is recorded with its error and
the run goes on. A slide is finished when its folder holds ``done.json``: the sha256 of each
result file, with the model and the options that made them. A run started again skips the slides
whose files still match it (same model and options), and scores the rest. ``summary.json`` in the
output folder sums the run up: slides done, skipped, failed (with their errors), tiles, tiles/s.
A run can be stopped from another thread (``cancel``, as a job is cancelled): in this process the
slide being scored stops at its next batch; on Ray the actors are killed.
"""

from __future__ import annotations

import collections
import csv
import glob
import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from service.repository import sha256_file
from service.scoring.outputs import write_json
from service.scoring.pipeline import ScoringModel
from service.scoring.scoring_errors import Cancelled, ScoringError
from service.scoring.slide_reader import SLIDE_SUFFIXES
from service.scoring.slide_scoring import SlideOptions, score_slide

__all__ = ["ArchiveItem", "list_archive", "score_archive", "finished", "result_files", "DONE_FILE", "SUMMARY_FILE",
           "LOCAL"]

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
SUMMARY_FILE = "summary.json"
LOCAL = "local"  # ray_address that starts a Ray instance on this machine, bound to 127.0.0.1
_POLL_S = 0.2  # how often the Ray driver looks at ``cancel`` while it waits for a slide


@dataclass(frozen=True)
class ArchiveItem:
    """One slide of the archive: ``name`` is its output folder under the run's output folder."""

    name: str
    path: Path


def _check_name(name: str, where: str) -> str:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise ScoringError(f"{where}: output name '{name}' must be a relative path without '..'")
    return Path(name).as_posix()


def _read_manifest(path: Path) -> list[ArchiveItem]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ScoringError(f"{path}: a manifest needs a 'path' column (found {reader.fieldnames})")
        items = []
        for line, row in enumerate(reader, 2):
            if not (row.get("path") or "").strip():
                raise ScoringError(f"{path} line {line}: empty path")
            slide = Path(row["path"].strip())
            slide = slide if slide.is_absolute() else path.parent / slide
            name = (row.get("name") or "").strip() or Path(row["path"].strip()).with_suffix("").as_posix()
            items.append(ArchiveItem(_check_name(name, f"{path} line {line}"), slide))
    return items


def list_archive(source: str | Path) -> list[ArchiveItem]:
    """The slides of ``source``: a folder (every slide file under it, by suffix, in sorted order),
    a glob pattern, or a CSV manifest with a ``path`` column (relative paths are relative to the
    CSV's folder) and an optional ``name`` column (the output folder; default: the path without
    its suffix)."""
    text = str(source)
    path = Path(source)
    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            items = _read_manifest(path)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ScoringError(f"{path}: not a readable CSV manifest ({type(exc).__name__}: {exc})") from None
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        items = [ArchiveItem(p.relative_to(path).with_suffix("").as_posix(), p) for p in files]
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        items = [ArchiveItem(p.with_suffix("").name, p) for p in files]
    else:
        raise ScoringError(f"{source}: not a folder, a glob pattern or a .csv manifest")
    if not items:
        raise ScoringError(f"{source}: no slides found (suffixes: {', '.join(sorted(SLIDE_SUFFIXES))})")
    seen = collections.Counter(item.name for item in items)
    twice = sorted(name for name, count in seen.items() if count > 1)
    if twice:
        raise ScoringError(f"{source}: several slides would write to the same output folder: {', '.join(twice)} "
                           "(give a manifest with a 'name' column)")
    return items


def _stamp(model_key: dict[str, str], options: SlideOptions) -> dict[str, Any]:
    return {"model": model_key, "options": asdict(options)}


def finished(out_dir: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds the complete results of a run with this model and these options:
    ``done.json`` matches, and every file it lists has its recorded sha256."""
    try:
        done = json.loads((out_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or {k: done.get(k) for k in stamp} != stamp or not done.get("files"):
        return False
    for name, digest in done["files"].items():
        file = out_dir / name
        if not file.is_file() or sha256_file(file) != digest:
            return False
    return True


def _seal(out_dir: Path, results: list[str], stamp: dict[str, Any]) -> None:
    write_json(out_dir / DONE_FILE, {**stamp, "files": {name: sha256_file(out_dir / name) for name in results}})


def result_files(out: Path, items: Sequence[ArchiveItem]) -> list[str]:
    """The files of ``out`` a finished run leaves for its reader: ``summary.json``, then every
    sealed slide's result files (``<name>/<file>``, as listed in its ``done.json``)."""
    files = [SUMMARY_FILE] if (out / SUMMARY_FILE).is_file() else []
    for item in items:
        try:
            done = json.loads((out / item.name / DONE_FILE).read_text())
        except (OSError, ValueError):
            continue
        files += [f"{item.name}/{name}" for name in done.get("files", {})]
    return files


def score_item(model, item: ArchiveItem, out: Path, options: SlideOptions, stamp: dict[str, Any],
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Score one slide into ``out / item.name`` and seal it; a record of what happened (never raises
    for a bad slide; raises Cancelled when ``cancel`` is set)."""
    out_dir = out / item.name
    (out_dir / DONE_FILE).unlink(missing_ok=True)  # files about to change are no longer sealed
    t0 = time.perf_counter()
    try:
        meta = score_slide(model, item.path, out_dir, options, cancel=cancel)
        _seal(out_dir, meta["results"], stamp)
    except Cancelled:
        raise
    except ScoringError as exc:
        return {"name": item.name, "path": str(item.path), "status": "failed", "error": str(exc),
                "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # an unexpected failure on one slide must not end the run
        log.exception("slide %s failed", item.path)
        return {"name": item.name, "path": str(item.path), "status": "failed",
                "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - t0, 3)}
    return {"name": item.name, "path": str(item.path), "status": "done", "tiles": meta["counts"]["scored_tiles"],
            "seconds": round(time.perf_counter() - t0, 3), "host": os.uname().nodename, "pid": os.getpid()}


class SlideWorker:
    """One model session, reused for every slide given to it (a Ray actor in ``score_archive``)."""

    def __init__(self, model_dir: str, model: str, version: str, threads: int):
        from service.score import load_model

        self.model = load_model(Path(model_dir), model, version, threads)

    def ready(self) -> bool:
        """Answers once the actor has started and loaded its model."""
        return True

    def score(self, item: ArchiveItem, out: str, options: SlideOptions, stamp: dict[str, Any]) -> dict[str, Any]:
        return score_item(self.model, item, Path(out), options, stamp)


def _on_loopback(address: str) -> bool:
    """Whether ``address`` is this machine's loopback (``local``, ``127.0.0.1:6379``, ``localhost:6379``):
    the driver then joins the cluster on 127.0.0.1 too. Ray client addresses (``ray://``) connect
    from outside and are left as given."""
    if address == LOCAL:
        return True
    if address.startswith("ray://"):
        return False
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RayConnection:
    """This process's connection to Ray, shared by the runs that use it at once (several archive
    jobs of one service): the first opens it, the last closes it, when it was opened here."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._owned = False

    def acquire(self, address: str, workers: int, threads: int):
        """``ray``, initialised (``workers`` x ``threads`` CPUs for a ``local`` instance)."""
        loopback = _on_loopback(address)
        if loopback:
            # every Ray socket on loopback (read when ray is imported; see docs/distributed.md)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise ScoringError("Ray is not installed: pip install 'gsa-serve[distributed]' (or score in this "
                               "process: no --ray-address, no GSA_RAY_ADDRESS)") from None
        with self._lock:
            if not ray.is_initialized():
                node = {"_node_ip_address": "127.0.0.1"} if loopback else {}
                if address == LOCAL:
                    # "local": a new instance, never a cluster already running on this machine
                    ray.init(address="local", num_cpus=workers * max(1, threads), include_dashboard=False,
                             log_to_driver=False, configure_logging=False, **node)
                else:
                    try:
                        ray.init(address=address, log_to_driver=False, configure_logging=False, **node)
                    except (ConnectionError, RuntimeError) as exc:
                        raise ScoringError(
                            f"cannot connect to the Ray cluster at {address}: {exc} (is it running? a cluster with "
                            "token authentication needs RAY_AUTH_MODE=token and its token here)") from None
                self._owned = True
            self._users += 1
        return ray

    def release(self, ray) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._owned:
                ray.shutdown()
                self._owned = False


_RAY = _RayConnection()


def _on_ray(address: str, pending: list[ArchiveItem], out: Path, options: SlideOptions, stamp: dict[str, Any],
            model_dir: Path, model: str, version: str, workers: int, threads: int,
            report: Callable[[dict[str, Any]], None], cancel: threading.Event | None,
            start_timeout_s: float) -> list[dict[str, Any]]:
    ray = _RAY.acquire(address, workers, threads)
    try:
        from ray.exceptions import RayError

        # a worker that dies (a crash in a slide library) is started again for the next slides
        worker = ray.remote(num_cpus=max(1, threads), max_restarts=2)(SlideWorker)
        actors = [worker.remote(str(model_dir.resolve()), model, version, max(1, threads))
                  for _ in range(min(workers, len(pending)))]
        idle, running, queue, records = list(actors), {}, collections.deque(pending), []
        try:
            # a cluster that cannot place or start the actors (too few free CPUs, a node that cannot
            # load the model) would otherwise leave the run waiting for ever
            waiting, deadline = [a.ready.remote() for a in actors], time.monotonic() + start_timeout_s
            while waiting:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ScoringError(
                        f"{len(waiting)} of {len(actors)} Ray workers did not start within {start_timeout_s:g} s: does "
                        f"the cluster have {max(1, threads)} free CPU(s) for each, and the model repository at "
                        f"{model_dir.resolve()} on every node?")
                ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(left, _POLL_S))
                for ref in ready:
                    try:
                        ray.get(ref)
                    except RayError as exc:  # the actor's start failed (its model did not load)
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise ScoringError(f"a Ray worker failed to start: {type(exc).__name__}: {first}") from None
            while queue or running:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                while queue and idle:
                    actor, item = idle.pop(), queue.popleft()
                    running[actor.score.remote(item, str(out.resolve()), options, stamp)] = (item, actor)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=None if cancel is None else _POLL_S)
                if not ready:
                    continue
                item, actor = running.pop(ready[0])
                try:
                    record = ray.get(ready[0])
                except RayError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    record = {"name": item.name, "path": str(item.path), "status": "failed",
                              "error": f"the Ray worker failed: {type(exc).__name__}: {first}"}
                idle.append(actor)
                records.append(record)
                report(record)
        finally:
            # also when interrupted or cancelled: no slide goes on being written after the run has stopped
            for actor in actors:
                ray.kill(actor, no_restart=True)
        return records
    finally:
        _RAY.release(ray)


def score_archive(
    source: str | Path | Sequence[ArchiveItem],
    out: str | Path,
    *,
    model_dir: Path,
    model: str | None,
    version: str | None = None,
    options: SlideOptions | None = None,
    ray_address: str | None = None,
    workers: int = 1,
    threads: int = 0,
    progress: Callable[[dict[str, Any], int, int], None] | None = None,
    session: ScoringModel | None = None,
    cancel: threading.Event | None = None,
    start_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Score every slide of ``source`` (see ``list_archive``; or the items it listed) into
    ``out/<name>/``; write and return the run summary. ``ray_address`` None scores in this process,
    one slide after another, with ``session`` when given (a model already loaded: the service's);
    ``"local"`` starts a Ray instance on this machine with ``workers`` actors; anything else
    (``"auto"``, ``"127.0.0.1:6379"``, ``"ray://host:10001"``) connects to a running cluster.
    ``threads``: ONNX Runtime threads (and Ray CPUs) per actor; 0 in this process means one per core.
    ``progress(record, done, pending)`` follows every slide scored; ``cancel``, once set, stops the
    run with Cancelled (no summary is written: the slides finished so far are sealed and a run
    started again skips them). On Ray, the actors must start (and load the model) within
    ``start_timeout_s``, else ScoringError. ``model`` None: the repository's best pathology model.

    Raises:
        ScoringError: nothing to score (see ``list_archive``), an unknown model, Ray missing.
        Cancelled: ``cancel`` was set.
    """
    from service.score import find_version, load_model

    if workers < 1:
        raise ScoringError(f"workers must be at least 1, got {workers}")
    options = (options or SlideOptions()).checked()
    out = Path(out)
    items = list_archive(source) if isinstance(source, (str, Path)) else list(source)
    if not items:
        raise ScoringError("no slides to score")
    entry = find_version(model_dir, model, version or (session.card.version if session is not None else None))
    if session is not None and session.card.sha256 != entry.card.sha256:
        raise ScoringError(f"the model given for {entry.name}/{entry.version} is not the repository's graph")
    stamp = _stamp({"name": entry.name, "version": entry.version, "sha256": entry.card.sha256}, options)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [item for item in items if finished(out / item.name, stamp)]
    pending = [item for item in items if item not in skipped]
    done_count = [0]

    def report(record: dict[str, Any]) -> None:
        done_count[0] += 1
        if progress is not None:
            progress(record, done_count[0], len(pending))

    t0 = time.perf_counter()
    if not pending:
        records = []
    elif ray_address is None:
        session = session or load_model(model_dir, entry.name, entry.version, threads)
        records = []
        for item in pending:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            records.append(score_item(session, item, out, options, stamp, cancel))
            report(records[-1])
    else:
        records = _on_ray(ray_address, pending, out, options, stamp, model_dir, entry.name, entry.version,
                          workers, threads, report, cancel, start_timeout_s)
    wall = time.perf_counter() - t0
    done = [r for r in records if r["status"] == "done"]
    tiles = sum(r["tiles"] for r in done)
    order = {item.name: i for i, item in enumerate(items)}
    summary = {
        "model": stamp["model"], "options": stamp["options"],
        "engine": "this process" if ray_address is None else f"ray ({ray_address}), {workers} workers",
        "slides": len(items), "done": len(done), "skipped": len(skipped),
        "failed": [{k: r[k] for k in ("name", "path", "error")} for r in sorted(records, key=lambda r: order[r["name"]])
                   if r["status"] == "failed"],
        "tiles": tiles, "seconds": round(wall, 3), "tiles_per_s": round(tiles / wall, 2) if wall > 0 and tiles else 0.0,
        "slide_seconds": round(sum(r.get("seconds", 0.0) for r in done), 3),
        "per_slide": sorted(records, key=lambda r: order[r["name"]]),
        "skipped_slides": [item.name for item in skipped],
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary
