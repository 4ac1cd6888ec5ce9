"""Model metadata, readiness, statistics and the repository index."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.dependencies import ServerDep
from service.runtime import ModelServer, ModelVersion
from service.schemas import ErrorResponse, ModelMetadata

router = APIRouter(tags=["models"])
_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def _metadata(server: ModelServer, mv: ModelVersion) -> ModelMetadata:
    versions = list(server.versions[mv.name])
    card, model = mv.card, mv.served.session if mv.served is not None else None
    inputs = [model.input.as_dict()] if model else []
    outputs = [o.as_dict() for o in model.outputs] if model else []
    group = None
    if card is not None:
        group = {"name": card.group_name, "order": card.group_order, "elements": [e.as_dict() for e in card.elements]}
    return ModelMetadata(
        name=mv.name, versions=versions, platform="onnxruntime_onnx", inputs=inputs, outputs=outputs,
        state=mv.state.value, reason=mv.reason, execution_providers=mv.providers,
        labels=list(card.labels) if card else [], group=group, card=card.to_dict() if card else None,
    )


def _stats(server: ModelServer, versions: list[ModelVersion]) -> dict:
    return {"model_stats": [server.stats[(mv.name, mv.version)].as_dict() for mv in versions if (mv.name, mv.version) in server.stats]}


@router.get("/v2/models/stats")
async def all_stats(server: ServerDep) -> dict:
    """Inference statistics of every served model version (Triton's shape)."""
    return _stats(server, server.all())


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=_ERRORS)
async def model_metadata(model_name: str, server: ServerDep) -> ModelMetadata:
    """Metadata of a model's default (newest ready) version."""
    return _metadata(server, server.find(model_name))


@router.get("/v2/models/{model_name}/versions/{version}", response_model=ModelMetadata, responses=_ERRORS)
async def model_version_metadata(model_name: str, version: str, server: ServerDep) -> ModelMetadata:
    """Metadata of one model version."""
    return _metadata(server, server.find(model_name, version))


def _ready(mv: ModelVersion) -> JSONResponse:
    if mv.ready:
        return JSONResponse({"name": mv.name, "version": mv.version, "ready": True})
    reason = f": {mv.reason}" if mv.reason else ""
    return JSONResponse(
        {"name": mv.name, "version": mv.version, "ready": False,
         "error": f"model '{mv.name}' version '{mv.version}' is {mv.state.value}{reason}"},
        status_code=400,
    )


@router.get("/v2/models/{model_name}/ready", responses=_ERRORS)
async def model_ready(model_name: str, server: ServerDep) -> JSONResponse:
    """Whether the model's default version is ready (200) or not (400)."""
    return _ready(server.find(model_name))


@router.get("/v2/models/{model_name}/versions/{version}/ready", responses=_ERRORS)
async def model_version_ready(model_name: str, version: str, server: ServerDep) -> JSONResponse:
    """Whether one model version is ready (200) or not (400)."""
    return _ready(server.find(model_name, version))


@router.get("/v2/models/{model_name}/stats", responses=_ERRORS)
async def model_stats(model_name: str, server: ServerDep) -> dict:
    """Inference statistics of every version of a model (Triton's shape)."""
    server.find(model_name)
    return _stats(server, list(server.versions[model_name].values()))


@router.get("/v2/models/{model_name}/versions/{version}/stats", responses=_ERRORS)
async def model_version_stats(model_name: str, version: str, server: ServerDep) -> dict:
    """Inference statistics of one model version (Triton's shape)."""
    return _stats(server, [server.find(model_name, version)])


@router.post("/v2/repository/index")
async def repository_index(server: ServerDep) -> list[dict]:
    """Every model version in the repository with its state and, when broken, the reason."""
    return [
        {"name": mv.name, "version": mv.version, "state": mv.state.value, "reason": mv.reason}
        for mv in server.all()
    ]


@router.get("/v1/models")
async def list_models(server: ServerDep) -> dict:
    """Every model with its versions, default version, labels and state."""
    out = []
    for name, versions in server.versions.items():
        default = server.default(name)
        out.append({
            "name": name,
            "default_version": default.version if default.ready else None,
            "versions": [
                {"version": mv.version, "state": mv.state.value, "reason": mv.reason,
                 "task": mv.card.task if mv.card else None, "labels": list(mv.card.labels) if mv.card else []}
                for mv in versions.values()
            ],
        })
    return {"models": out}
