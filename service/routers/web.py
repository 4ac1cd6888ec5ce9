"""The web page for people at ``/``: static HTML, CSS and ES modules from ``service/static/``
(no build step, no CDN), served under ``/static/`` next to the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "router", "mount_static"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PREFIX = "/static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The web page."""
    # no-cache: the page revalidates (ETag) so that a new release's page is not mixed with old modules
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


class _RevalidatedFiles(StaticFiles):
    """Static files that browsers revalidate (ETag) before each use: after an upgrade, the page never
    runs old modules next to new ones."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_static(app: FastAPI) -> None:
    """Serve the page's assets under ``/static/``."""
    app.mount(STATIC_PREFIX, _RevalidatedFiles(directory=STATIC_DIR), name="static")
