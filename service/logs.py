"""JSON logging with the request id of the request being served (a context variable)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

__all__ = ["request_id_var", "configure_logging", "JsonFormatter"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_var.get()
        return super().format(record) + (f" [request_id={rid}]" if rid else "")


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Route the service's and uvicorn's loggers through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._gsa_serve = True  # type: ignore[attr-defined]  # ours: replaced when configured again
    for name in ("service", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        others = [h for h in logger.handlers if not getattr(h, "_gsa_serve", False)]
        if name != "service":
            others = []  # uvicorn's own handlers would print every line twice
        logger.handlers[:] = [*others, handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # the service writes its own access log (with request ids); uvicorn's would duplicate it
    logging.getLogger("uvicorn.access").disabled = True
