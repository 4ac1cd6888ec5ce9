"""FastAPI dependencies: settings, the model server, and the served model a path names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.runtime import ModelServer, ServedModel
from service.settings import Settings

__all__ = ["get_server", "SettingsDep", "ServerDep", "LatestModelDep", "VersionModelDep"]


# async: FastAPI would run plain functions in its thread pool, a thread hop per request.
async def get_server(request: Request) -> ModelServer:
    return request.app.state.server


async def app_settings(request: Request) -> Settings:
    """The settings the app was made with (``get_settings()`` unless a test passed its own)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(app_settings)]
ServerDep = Annotated[ModelServer, Depends(get_server)]


def _served(request: Request, server: ModelServer, name: str, version: str | None) -> ServedModel:
    """The ready version to run (404 unknown, 400 not ready, 503 loading); labels the request's
    metrics with the version it resolved to, also when it is not ready."""
    mv = server.find(name, version)
    request.state.model_labels = (mv.name, mv.version)
    served = server.get(name, version)
    request.state.model_labels = (served.name, served.version)
    return served


async def latest_model(request: Request, server: ServerDep, model_name: str) -> ServedModel:
    return _served(request, server, model_name, None)


async def version_model(request: Request, server: ServerDep, model_name: str, version: str) -> ServedModel:
    return _served(request, server, model_name, version)


LatestModelDep = Annotated[ServedModel, Depends(latest_model)]  # /models/{model_name}/...
VersionModelDep = Annotated[ServedModel, Depends(version_model)]  # /models/{model_name}/versions/{version}/...
