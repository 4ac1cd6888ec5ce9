"""Prometheus metrics of one app instance (its own registry, so that several apps can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServiceMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Every metric the service exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "gsa_http_requests", "HTTP requests by route, method and status code", ("route", "method", "status"), registry=r
        )
        self.http_duration = Histogram(
            "gsa_http_request_duration_seconds", "HTTP request duration by route", ("route",),
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inference_requests = Counter(
            "gsa_inference_requests", "Inference requests by model and outcome "
            "(success, bad_request, not_found, not_ready, too_large, overloaded, timeout, error)",
            ("model", "version", "outcome"), registry=r,
        )
        self.images = Counter("gsa_inferred_images", "Images run through a model", ("model", "version"), registry=r)
        self.queue_duration = Histogram(
            "gsa_queue_duration_seconds", "Time a request waited in the batch queue", ("model", "version"),
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute_duration = Histogram(
            "gsa_compute_duration_seconds", "Duration of one session run (one batch)", ("model", "version"),
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "gsa_batch_size", "Images per session run", ("model", "version"), buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("gsa_queue_depth", "Images waiting in the batch queue", ("model", "version"), registry=r)
        self.model_ready = Gauge("gsa_model_ready", "1 when the model version is served", ("model", "version"), registry=r)
        self.http_in_flight = Gauge("gsa_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.in_flight = 0  # the same number as a plain int: the batchers read it on every batch
        self.provider_info = Gauge(
            "gsa_model_execution_provider_info", "Execution provider a model version runs on (1 for the primary one)",
            ("model", "version", "provider"), registry=r,
        )
        self.jobs = Gauge("gsa_jobs", "Scoring jobs in the store by state", ("state",), registry=r)
        self.jobs_queued = Gauge("gsa_jobs_queued", "Scoring jobs waiting for a worker", registry=r)
        self.job_tiles = Counter(
            "gsa_job_tiles_scored", "Tiles (slides) and patches (patch sets) scored by jobs in this process", ("kind",),
            registry=r,
        )
