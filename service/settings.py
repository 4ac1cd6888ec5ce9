"""Service settings: one pydantic-settings class read from ``GSA_*`` environment variables.

Nested fields use ``__``: ``GSA_BATCHING__MAX_BATCH_SIZE=16``; per-model batching overrides are
keyed by model name, as JSON (``GSA_MODEL_BATCHING='{"gsa_tiny": {"max_batch_size": 8}}'``) or
nested (``GSA_MODEL_BATCHING__GSA_TINY__MAX_QUEUE_DELAY_MS=5``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["BatchingSettings", "BatchingOverride", "Settings", "get_settings"]


class BatchingSettings(BaseModel):
    """Dynamic batching of one model version."""

    enabled: bool = True  # off: every request runs alone, as sent
    max_batch_size: int = Field(32, ge=1)  # images merged into one session run
    max_queue_delay_ms: float = Field(2.0, ge=0)  # longest wait for a batch to fill
    # images waiting; beyond it requests get 429. Four maximal requests (GSA_MAX_IMAGES_PER_REQUEST),
    # so that one fits beside a crowd of small ones; whether it can finish in time is decided by the
    # deadline admission, not by this bound on memory
    max_queue_size: int = Field(1024, ge=1)
    workers: int = Field(1, ge=1)  # session runs in flight at once

    def merged(self, override: "BatchingOverride | None") -> "BatchingSettings":
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class BatchingOverride(BaseModel):
    """Per-model batching fields; unset ones keep the global value."""

    enabled: bool | None = None
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1)


class Settings(BaseSettings):
    """Every knob of the service, each with an explicit default."""

    model_config = SettingsConfigDict(env_prefix="GSA_", env_nested_delimiter="__", extra="ignore")

    # where and how to serve
    model_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    graceful_shutdown_s: float = Field(30.0, ge=0)  # in-flight requests get this long on shutdown

    # ONNX Runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    providers: list[str] | None = None  # explicit provider list, overrides ``device``
    intra_op_threads: int = Field(0, ge=0)  # 0: ONNX Runtime's default (one per core)
    inter_op_threads: int = Field(0, ge=0)
    allow_spinning: bool = True  # ORT's idle worker threads spin; off leaves the CPU to the event loop
    # On a GPU serve the card's ``fp16_file`` (the batched fp16 graph; the fp32 graph is laid out
    # for CPUs and ran 3.4-4.0x slower at batch 64 on an H200, see docs/benchmarks.md); CPUs get the fp32 graph.
    prefer_fp16: bool = True
    cuda_tf32: bool = False  # TF32 matrix products on CUDA: faster, but fp32 logits moved by ~1e-2 (H200)
    warmup: bool = True  # run every model once per batch size bucket before ready
    load_concurrency: int = Field(2, ge=1)  # versions loaded and warmed up at once at start-up

    # batching
    batching: BatchingSettings = BatchingSettings()
    model_batching: dict[str, BatchingOverride] = {}
    request_timeout_s: float = Field(30.0, gt=0)  # a request queued or computing longer gets 503

    # limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)  # 413 beyond
    max_images_per_request: int = Field(256, ge=1)  # images (or batch rows) in one request
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # decoded width x height of one image
    max_image_side: int = Field(8192, ge=1)  # width or height of one image

    # scoring jobs (slides and patch sets): state and results on disk, one folder per job
    jobs_dir: Path = Path("jobs")  # created on the first job; mount a volume here to keep jobs across restarts
    data_dir: Path | None = None  # path submissions must resolve inside it; None: uploads only
    # the model of slide, patch-set and archive jobs that name none; None: the served pathology model
    # (RGB, with an mpp in its card) whose default version reports the highest validation accuracy
    pathology_model: str | None = None
    max_concurrent_jobs: int = Field(1, ge=1)  # jobs running at once
    max_queued_jobs: int = Field(100, ge=1)  # jobs waiting; beyond it submissions get 429
    max_upload_bytes: int = Field(4 * 1024**3, ge=1)  # one uploaded slide or patch set; 413 beyond
    resume_jobs: bool = True  # on start, run again the jobs a stop interrupted (False: mark them failed)
    job_checkpoint_tiles: int = Field(256, ge=1)  # a running job saves its scored tiles (patches) this often
    job_lease_s: float = Field(60.0, gt=0)  # a job whose worker (another host) is silent this long is taken over
    job_poll_s: float = Field(1.0, gt=0)  # idle workers look for jobs queued by other processes this often
    # archive jobs (POST /v1/jobs/archives): None scores them in this process with the served model;
    # a Ray address ("local", "127.0.0.1:6379", "auto", "ray://host:10001") on a pool of Ray actors.
    # Ray (the 'distributed' extra) is imported only when such a job runs
    ray_address: str | None = None
    ray_workers: int = Field(1, ge=1)  # actors per archive job, one model session each
    ray_threads: int = Field(1, ge=1)  # ONNX Runtime threads (and Ray CPUs) per actor
    ray_start_timeout_s: float = Field(300.0, gt=0)  # the actors must start (model loaded) within this

    # authentication (service/auth.py): bearer API keys, kept as sha256 hashes
    auth: Literal["auto", "on", "off"] = "auto"  # auto: off when ``host`` is loopback, on otherwise
    api_keys: SecretStr | None = None  # GSA_API_KEYS: comma-separated ``name:sha256hex`` or plain keys
    api_keys_file: Path | None = None  # one ``name:sha256hex`` a line
    metrics_auth: bool = False  # True: /metrics needs a key too

    # readiness and logging
    strict_readiness: bool = False  # True: the server is ready only when every model is
    log_level: str = "INFO"
    log_json: bool = True
    access_log: bool = True

    def batching_for(self, model: str) -> BatchingSettings:
        # env var keys arrive lower-cased, so model names match case-insensitively
        overrides = {k.lower(): v for k, v in self.model_batching.items()}
        return self.batching.merged(overrides.get(model.lower()))


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests override the dependency or pass their own)."""
    return Settings()
