"""Errors the service answers with, each mapped to an HTTP status and the protocol's JSON shape
``{"error": "..."}``. Raised anywhere (inference, batcher, decoding) without importing FastAPI."""

from __future__ import annotations

__all__ = [
    "ServiceError",
    "BadRequest",
    "Unprocessable",
    "Forbidden",
    "NotFound",
    "Conflict",
    "ModelNotReady",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "Overloaded",
    "DeadlineUnmet",
    "RequestTimeout",
    "Unavailable",
]


class ServiceError(Exception):
    """Base class: ``status`` is the HTTP status, ``str(self)`` the message sent to the client."""

    status: int = 500
    outcome: str = "error"  # label in the request metrics

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status = 400
    outcome = "bad_request"


class Unprocessable(ServiceError):
    """Well-formed input the model cannot take as is (wrong image size, channels)."""

    status = 422
    outcome = "bad_request"


class Forbidden(ServiceError):
    """A path outside the directory the service may read, or a feature that is switched off."""

    status = 403
    outcome = "forbidden"


class NotFound(ServiceError):
    status = 404
    outcome = "not_found"


class Conflict(ServiceError):
    """The resource is not in a state that allows the request (results of an unfinished job)."""

    status = 409
    outcome = "conflict"


class ModelNotReady(ServiceError):
    """A model that exists in the repository but failed to load (or is still loading)."""

    status = 400
    outcome = "not_ready"


class PayloadTooLarge(ServiceError):
    status = 413
    outcome = "too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    outcome = "unsupported_media_type"


class Overloaded(ServiceError):
    """The batch queue is full: come back after ``retry_after_s``."""

    status = 429
    outcome = "overloaded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, {"Retry-After": str(max(1, int(retry_after_s)))})


class DeadlineUnmet(Overloaded):
    """Refused up front: at the measured speed, with the images queued ahead of it, the request
    would not finish within its timeout. 503 with a Retry-After (an :class:`Overloaded`, so that
    scoring jobs wait and retry)."""

    status = 503


class RequestTimeout(ServiceError):
    """The request waited (queued or computing) past its timeout."""

    status = 503
    outcome = "timeout"


class Unavailable(ServiceError):
    """The server is shutting down or not ready."""

    status = 503
    outcome = "unavailable"
