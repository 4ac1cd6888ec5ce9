"""FastAPI dependencies: settings, the model server, and the model version a path names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.repository import ModelVersion
from service.runtime import ModelServer
from service.settings import Settings

__all__ = ["get_server", "SettingsDep", "ServerDep", "served_model"]


# async: FastAPI would run plain functions in its thread pool, a thread hop per request.
async def get_server(request: Request) -> ModelServer:
    return request.app.state.server


async def app_settings(request: Request) -> Settings:
    """The settings the app was made with (``get_settings()`` unless a test passed its own)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(app_settings)]
ServerDep = Annotated[ModelServer, Depends(get_server)]


def served_model(request: Request, server: ModelServer, name: str, version: str | None) -> ModelVersion:
    """The ready version to run (404 unknown, 400 not ready); labels the request's metrics."""
    mv = server.repository.find(name, version)
    request.state.model_labels = (mv.name, mv.version)
    mv = server.repository.get(name, version)
    request.state.model_labels = (mv.name, mv.version)
    return mv
