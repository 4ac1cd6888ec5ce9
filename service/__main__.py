"""``python -m service``: serve the model repository (``GSA_MODEL_DIR``, default ``models/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from service.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--model-dir", default=None, help="model repository (overrides GSA_MODEL_DIR)")
    args = parser.parse_args(argv)
    update = {"host": args.host, "port": args.port}  # GSA_AUTH=auto decides from the address bound
    if args.model_dir is not None:
        update["model_dir"] = Path(args.model_dir)
    settings = settings.model_copy(update=update)
    from service.app import create_app
    from service.auth import AuthConfigError

    try:
        app = create_app(settings)
    except AuthConfigError as exc:
        sys.exit(f"python -m service: {exc}")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # the app configures logging (JSON lines)
        access_log=False,  # the app writes its own access log with request ids
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )


if __name__ == "__main__":
    main()
