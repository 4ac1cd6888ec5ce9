"""Scoring jobs: submit a slide or a patch set (uploaded, or a path inside the data directory) or a
slide archive (a path inside the data directory), follow its progress, download its results, cancel it."""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from service.dependencies import ServerDep, SettingsDep
from service.errors import (BadRequest, Forbidden, NotFound, PayloadTooLarge, Unavailable, Unprocessable,
                            UnsupportedMediaType)
from service.jobs import RESULT_MEDIA_TYPES, Job, JobManager, JobState
from service.scoring.patch_scoring import PatchOptions, fit_patches, open_patches
from service.scoring.scoring_errors import BadParameter, ScoringError
from service.scoring.slide_scoring import SlideOptions, check_model
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_UPLOAD_DOC = {"openapi_extra": {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["model", "path"], "properties": {
        "model": {"type": "string"}, "version": {"type": "string"}, "path": {"type": "string"},
        "options": {"type": "object"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}, "status_code": 202}
_PATH_DOC = {"openapi_extra": {"requestBody": {"required": True, "content": {
    "application/json": _UPLOAD_DOC["openapi_extra"]["requestBody"]["content"]["application/json"],
}}}, "status_code": 202}


def _jobs(request: Request) -> JobManager:
    return request.app.state.jobs


def _principal(request: Request) -> str | None:
    """The caller's key id (set by the auth middleware), or None with auth off: then every job is visible."""
    return getattr(request.state, "principal", None)


def job_view(job: Job) -> dict[str, Any]:
    data = job.as_dict()
    base = f"/v1/jobs/{job.id}"
    data["links"] = {"self": base, "results": {name: f"{base}/results/{name}" for name in job.results}}
    return data


def resolve_data_path(settings: Settings, given: str) -> Path:
    """``given`` (relative to the data directory, or absolute) resolved with symlinks followed; it must
    stay inside the data directory."""
    if settings.data_dir is None:
        raise Forbidden("path submissions are disabled: set GSA_DATA_DIR to the folder the service may read; "
                        "or upload the file")
    root = Path(settings.data_dir).resolve()
    if not given or "\x00" in given:
        raise BadRequest("'path' must be a non-empty path")
    candidate = Path(given)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise Forbidden(f"path {given!r} is outside the data directory; give a path inside GSA_DATA_DIR")
    if not resolved.exists():
        raise NotFound(f"path {given!r} does not exist in the data directory")
    return resolved


def resolve_archive_path(settings: Settings, given: str) -> Path:
    """An archive's path: a folder or CSV manifest (as ``resolve_data_path``), or a glob pattern whose
    folder part resolves inside the data directory (the slides it matches are checked when listed)."""
    if not glob.has_magic(given) or "\x00" in given:
        return resolve_data_path(settings, given)
    parts = Path(given).parts
    if ".." in parts:
        raise Forbidden(f"path {given!r} is outside the data directory; give a path inside GSA_DATA_DIR")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return resolve_data_path(settings, str(Path(*parts[:first])) if first else ".").joinpath(*parts[first:])


def _check_archive(settings: Settings, jobs: JobManager, path: Path) -> None:
    """An archive job is refused now when it cannot run: no slide to score, a slide outside the data
    directory, or a Ray address without Ray installed."""
    if settings.ray_address is not None and importlib.util.find_spec("ray") is None:
        raise Unavailable("archive jobs run on Ray (GSA_RAY_ADDRESS is set) but Ray is not installed here: "
                          "pip install 'gsa-serve[distributed]', or unset GSA_RAY_ADDRESS to score in this process")
    jobs.archive_items(path)


def _check_options(settings: Settings, kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options a client may not set, and paths in options held to the data directory."""
    if "max_plain_pixels" in options:
        raise BadRequest("'max_plain_pixels' is a server limit, not a job option")
    if kind == "patches" and options.get("labels_path") is not None:
        resolved = resolve_data_path(settings, str(options["labels_path"]))
        options = {**options, "labels_path": str(resolved.relative_to(Path(settings.data_dir).resolve()))}
    return options


def _check_fit(server, kind: str, name: str, version: str | None, path: Path, options: dict[str, Any],
               data_dir: Path | None) -> None:
    """Inputs that cannot fit the model are refused now (422), not queued to fail: a slide needs a square
    RGB model; a patch set's first patch must fit the model's size (``fit``) and colours (``convert``)."""
    card = server.find(name, version).card
    try:
        opts = (PatchOptions if kind == "patches" else SlideOptions).from_dict(options)
    except (BadParameter, TypeError) as exc:
        raise BadRequest(f"invalid options: {exc}") from None
    if card is None:
        return
    try:
        if isinstance(opts, SlideOptions):
            check_model(card, opts)
            return
        labels = Path(data_dir).resolve() / opts.labels_path if opts.labels_path and data_dir else None
        patches = open_patches(path, card.labels, labels)
        try:
            if len(patches):
                fit_patches(patches.read(0, 1), card, opts.fit, opts.convert)
        finally:
            patches.close()
    except (BadParameter, TypeError) as exc:
        raise Unprocessable(f"the input does not fit model '{card.name}': {exc}") from None
    except ScoringError:
        return  # unreadable input: the job fails and says why, as for slides


def _check_model(server, kind: str, name: str, version: str | None, options: dict[str, Any]) -> None:
    """Unknown models are 404 now; a slide or archive job for a model without mpp, or embeddings from a
    model without features, are 400 now."""
    mv = server.find(name, version)
    if kind in ("slide", "archive") and mv.card is not None and mv.card.mpp is None:
        raise BadRequest(f"model '{mv.name}' version '{mv.version}' has no resolution ('mpp') in its card, so slides "
                         "cannot be tiled at its scale; use a pathology model exported with --mpp")
    if options.get("embeddings", "none") != "none" and mv.card is not None and mv.card.feature_dim is None:
        raise BadRequest(f"model '{mv.name}' version '{mv.version}' was exported without features: no embeddings "
                         "to write; export it with --features or leave the option out")


def _model_name(server, settings: Settings, model: str | None) -> str:
    """The named model; else GSA_PATHOLOGY_MODEL; else the best pathology model (RGB, with an mpp;
    highest validation accuracy)."""
    if model:
        return model
    if settings.pathology_model:
        if settings.pathology_model not in server.versions:
            raise BadRequest(f"the default pathology model '{settings.pathology_model}' (GSA_PATHOLOGY_MODEL) is not "
                             f"served; name the model (served: {', '.join(sorted(server.versions)) or 'none'})")
        return settings.pathology_model
    best = server.best_pathology_model()
    if best is None:
        raise BadRequest("name the model (no pathology model, RGB with an 'mpp' in its card, is served to default to)")
    return best


async def _save_upload(request: Request, dest: Path, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload of {declared} bytes is over the limit of {limit} (GSA_MAX_UPLOAD_BYTES)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with dest.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload is over the limit of {limit} bytes (GSA_MAX_UPLOAD_BYTES)")
            f.write(chunk)
    if size == 0:
        raise BadRequest("the upload is empty")


async def _submit(request: Request, server, settings: Settings, kind: str, model: str | None, version: str | None,
                  filename: str | None, options: str | None) -> JSONResponse:
    jobs = _jobs(request)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "archive" and media_type != "application/json":
        raise BadRequest('archive jobs take no upload: send JSON {"path": ..., "model": ..., "options": {...}} '
                         "naming a folder, a glob pattern or a CSV manifest inside the data directory (GSA_DATA_DIR)")
    if media_type == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for a body that is not UTF-8
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if (not isinstance(body, dict) or not isinstance(body.get("path"), str)
                or not all(isinstance(body.get(k), (str, type(None))) for k in ("model", "version"))):
            raise BadRequest('expected {"path": "...", "model": optional, "version": optional, "options": {...}} '
                             '(model and version strings or null)')
        opts = body.get("options") or {}
        if not isinstance(opts, dict):
            raise BadRequest("'options' must be an object")
        name = _model_name(server, settings, body.get("model"))
        _check_model(server, kind, name, body.get("version"), opts)
        path = (resolve_archive_path if kind == "archive" else resolve_data_path)(settings, body["path"])
        opts = _check_options(settings, kind, opts)
        await asyncio.to_thread(_check_fit, server, kind, name, body.get("version"), path, opts, settings.data_dir)
        if kind == "archive":
            await asyncio.to_thread(_check_archive, settings, jobs, path)
        job = jobs.submit(kind, name, body.get("version"), path, False, opts, owner=_principal(request))
    elif media_type in ("application/octet-stream", "image/tiff", "image/png", "image/jpeg", "application/x-hdf5",
                        "application/x-hdf"):
        model = _model_name(server, settings, model)
        try:
            opts = json.loads(options) if options else {}
        except ValueError as exc:
            raise BadRequest(f"'options' is not valid JSON: {exc}") from None
        if not isinstance(opts, dict):
            raise BadRequest("'options' must be a JSON object")
        _check_model(server, kind, model, version, opts)
        opts = _check_options(settings, kind, opts)
        job_id = jobs.new_id()
        name = _SAFE_NAME.sub("_", Path(filename or "upload").name).strip("._") or "upload"
        dest = jobs.input_dir(job_id) / name
        try:
            await _save_upload(request, dest, settings.max_upload_bytes)
            await asyncio.to_thread(_check_fit, server, kind, model, version, dest, opts, settings.data_dir)
            job = jobs.submit(kind, model, version, dest, True, opts, job_id=job_id, owner=_principal(request))
        except BaseException:
            shutil.rmtree(jobs.root / job_id, ignore_errors=True)
            raise
    else:
        raise UnsupportedMediaType(f"unsupported content type {media_type or '(none)'!r}: send JSON naming a path "
                                   "in the data directory, or the file itself as application/octet-stream")
    return JSONResponse(job_view(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


ModelQuery = Query(None, description="model name (uploads; default: the best pathology model served)")
VersionQuery = Query(None, description="model version (uploads; default the newest)")
FilenameQuery = Query(None, description="name of the uploaded file (its extension tells the format)")
OptionsQuery = Query(None, description="scoring options as a JSON object (uploads)")


@router.post("/slides", **_UPLOAD_DOC)
async def submit_slide(
    request: Request, server: ServerDep, settings: SettingsDep, model: str | None = ModelQuery,
    version: str | None = VersionQuery, filename: str | None = FilenameQuery, options: str | None = OptionsQuery,
) -> JSONResponse:
    """Queue a whole-slide scoring job (202 with the job)."""
    return await _submit(request, server, settings, "slide", model, version, filename, options)


@router.post("/patches", **_UPLOAD_DOC)
async def submit_patches(
    request: Request, server: ServerDep, settings: SettingsDep, model: str | None = ModelQuery,
    version: str | None = VersionQuery, filename: str | None = FilenameQuery, options: str | None = OptionsQuery,
) -> JSONResponse:
    """Queue a patch-set scoring job (202 with the job)."""
    return await _submit(request, server, settings, "patches", model, version, filename, options)


@router.post("/archives", **_PATH_DOC)
async def submit_archive(request: Request, server: ServerDep, settings: SettingsDep) -> JSONResponse:
    """Queue a slide archive job: a folder, glob pattern or CSV manifest in the data directory (202 with the job)."""
    return await _submit(request, server, settings, "archive", None, None, None, None)


@router.get("")
async def list_jobs(
    request: Request,
    limit: int = Query(50, ge=1, le=500, description="jobs per page"),
    cursor: str | None = Query(None, description="the 'next' of the previous page"),
    offset: int = Query(0, ge=0, le=10**9, description="jobs to skip (without a cursor; at most 10^9)"),
    state: JobState | None = Query(None, description="only jobs in this state"),
    order: Literal["asc", "desc"] = Query("asc", description="oldest (asc) or newest (desc) first"),
) -> JSONResponse:
    """The caller's jobs, oldest first, a page at a time (``next``: the cursor of the next page, or null)."""
    page = await asyncio.to_thread(_jobs(request).list, limit, cursor, offset, _principal(request),
                                   state.value if state is not None else None, order == "desc")
    return JSONResponse({"jobs": [job_view(j) for j in page.jobs], "next": page.next})


@router.get("/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    """A job's state and progress (tiles or patches done and total)."""
    return JSONResponse(job_view(await asyncio.to_thread(_jobs(request).get, job_id, _principal(request))))


@router.delete("/{job_id}")
async def delete_job(job_id: str, request: Request) -> JSONResponse:
    """Cancel a queued or running job; forget a finished one and delete its files."""
    jobs, principal = _jobs(request), _principal(request)
    job = await asyncio.to_thread(jobs.get, job_id, principal)
    if job.state.finished:
        await asyncio.to_thread(jobs.delete, job_id, principal)
        return JSONResponse({"id": job_id, "deleted": True})
    return JSONResponse(job_view(await asyncio.to_thread(jobs.cancel, job_id, principal)), status_code=202)


@router.get("/{job_id}/results/{name:path}")
async def get_result(job_id: str, name: str, request: Request) -> FileResponse:
    """Download one result file of a finished job (an archive's: ``summary.json`` or ``<slide>/<file>``)."""
    path = await asyncio.to_thread(_jobs(request).result_path, job_id, name, _principal(request))
    return FileResponse(path, media_type=RESULT_MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                        filename=f"{job_id[:8]}-{name.replace('/', '_')}")
