"""Server liveness, readiness and metadata (Open Inference Protocol)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import __version__
from service.dependencies import ServerDep
from service.schemas import ErrorResponse, ServerMetadata

router = APIRouter(prefix="/v2", tags=["health"])

EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_repository_index"]


@router.get("/health/live")
async def live() -> dict:
    """Whether the server process is up (200) or not."""
    return {"live": True}


@router.get("/health/ready", responses={400: {"model": ErrorResponse}})
async def ready(server: ServerDep):
    """Whether every model can serve, a version loaded and warmed up (200), or not yet (400)."""
    if server.ready:
        return {"ready": True}
    reason = "shutting down" if server.shutting_down else "models are loading" if server.loading else "a model failed to load"
    return JSONResponse({"ready": False, "error": f"server is not ready: {reason}"}, status_code=400)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name="gsa-serve", version=__version__, extensions=EXTENSIONS)
