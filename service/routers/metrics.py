"""Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the service and every model version."""
    server = request.app.state.server
    for mv in server.all():
        if mv.served is not None:
            server.metrics.queue_depth.labels(mv.name, mv.version).set(mv.served.batcher.queue_depth)
    counts = await asyncio.to_thread(request.app.state.jobs.store.counts)
    for state, count in counts.items():
        server.metrics.jobs.labels(state).set(count)
    server.metrics.jobs_queued.set(counts["queued"])
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)
