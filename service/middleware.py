"""Pure ASGI middleware: request ids, access log, HTTP metrics, and the request body limit."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.logs import request_id_var
from service.metrics import ServiceMetrics

__all__ = ["RequestContextMiddleware", "BodyLimitMiddleware", "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
access_log = logging.getLogger("service.access")


class RequestContextMiddleware:
    """Takes ``X-Request-ID`` from the request (or makes one), returns it, puts it in every log
    line of the request, and records one access log line and the HTTP metrics."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, access_log_enabled: bool = True):
        self.app = app
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()
        self.metrics.in_flight += 1
        self.metrics.http_in_flight.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.http_in_flight.dec()
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.http_duration.labels(path).observe(elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1000,
                    extra={"method": scope["method"], "path": scope["path"], "status": status,
                           "duration_ms": round(elapsed * 1000, 2)},
                )
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """Answers 413 for a declared Content-Length over ``max_bytes``, and stops a chunked body that
    grows past it (the endpoint reading it gets :class:`PayloadTooLarge`). Paths under one of
    ``large_prefixes`` (slide uploads) get ``large_max_bytes`` instead."""

    def __init__(self, app: ASGIApp, max_bytes: int, large_prefixes: tuple[str, ...] = (), large_max_bytes: int = 0):
        self.app = app
        self.max_bytes = max_bytes
        self.large_prefixes = large_prefixes
        self.large_max_bytes = max(large_max_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        large = any(scope["path"].startswith(prefix) for prefix in self.large_prefixes)
        limit = self.large_max_bytes if large else self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            body = json.dumps({"error": f"request body of {declared} bytes is over the limit of {limit}"}).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
