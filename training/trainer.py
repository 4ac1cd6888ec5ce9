"""A training loop that knows nothing about the model (minGPT style).

The trainer takes any ``nn.Module`` mapping images ``[B, C, H, W]`` to logits ``[B, K]``, a
training set, a validation set (never the test set) and a :class:`~training.config.TrainConfig`.
It owns the optimizer, the per-step learning-rate schedule, mixed precision (bf16 autocast on
CUDA only), gradient clipping, an optional exponential moving average of the weights
(:class:`torch.optim.swa_utils.AveragedModel`), seeding, checkpoints (latest and best on validation accuracy), a
JSON-lines metrics log and a progress bar.

Exact resumption: the order of each epoch's batches comes from a DataLoader generator seeded
with ``(seed, epoch)``, and every other RNG state (python, numpy, torch, CUDA) is saved at the
end of each epoch and restored on resume, so ``1 epoch + resume 1`` equals ``2 epochs`` bit for bit.
With ``train.checkpoint_every_steps`` the latest checkpoint is also written inside an epoch (the
steps done, the epoch's running sums and the augmentation generator's state with it); a resumed
run replays the epoch's batch order, skips the batches already trained on and goes on exactly
where it stopped, so a long epoch survives a short session.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from training.checkpoint import (
    CheckpointError,
    DataMismatchError,
    capture_rng_state,
    load_checkpoint,
    model_metadata,
    restore_rng_state,
    save_checkpoint,
)
from training.config import OptimConfig, ScheduleConfig, TrainConfig, config_to_dict
from training.data.common import dataset_fingerprint
from training.data.transforms import hed_jitter, random_d4, rotate_bilinear
from training.evaluate import evaluate_loader
from training.networks import REGULARISATION_FIELDS, SPEED_ONLY_FIELDS

__all__ = ["Trainer", "seed_everything", "resolve_device", "build_optimizer", "build_scheduler", "lr_lambda"]

logger = logging.getLogger(__name__)

LATEST, BEST, METRICS = "checkpoint_latest.pt", "checkpoint_best.pt", "metrics.jsonl"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast: automatic on CUDA devices that support it; on CPU only when asked."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        logger.warning("bf16 autocast on %s was asked for; it is only automatic on CUDA", device)
    if mode == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def ema_update(decay: float, warmup: bool):
    """``multi_avg_fn`` of :class:`AveragedModel`: ``avg = d avg + (1 - d) w`` after every step.

    With ``warmup`` the decay of the update after ``t`` earlier ones is ``min(decay, (1 + t) / (10 + t))``
    (as TensorFlow's moving average with ``num_updates``). Without it a short run's average stays
    dominated by its first weights: after 1,000 steps at decay 0.999 the copy made at the first
    step still weighs ``0.999 ** 999`` = 37% of the average.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        t = int(num_averaged)
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam (L2 weight decay, the paper's choice), AdamW (decoupled) or SGD with momentum."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_lambda(cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Learning-rate multiplier of optimizer step ``s`` (0-based) for a schedule config."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones = sorted(m * steps_per_epoch for m in cfg.milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "multistep":
            return cfg.gamma ** sum(step >= m for m in milestones)
        if cfg.name == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch, epochs))


class Trainer:
    """Train a model on a training set, validating each epoch on a validation set.

    Args:
        model: Any module mapping ``[B, C, H, W]`` images in [0, 1] to logits ``[B, K]``; for
            checkpoints it needs ``.name`` and a dataclass ``.config`` (as registry models have).
        train_set: Yields ``(image, label)``.
        val_set: Validation set (never the test set), evaluated after every epoch.
        config: The run's configuration; ``config.train.out_dir`` receives checkpoints and metrics.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset, config: TrainConfig):
        self.config = config
        self.run = config.train
        self.device = resolve_device(self.run.device)
        self.amp_dtype = _amp_dtype(self.run.amp, self.device)
        self.model = model.to(self.device)
        self.train_set, self.val_set = train_set, val_set
        self.out_dir = Path(self.run.out_dir)
        self.fingerprint = dataset_fingerprint(train=train_set, val=val_set)
        self.loader_generator = torch.Generator()
        self.augment_generator = torch.Generator()
        self.train_loader = self._loader(train_set, self.run.batch_size, shuffle=True)
        self.val_loader = self._loader(val_set, self.run.eval_batch_size, shuffle=False)
        self.steps_per_epoch = len(self.train_loader)
        if self.run.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.run.max_steps_per_epoch)
        if self.run.init_from:
            self.init_weights(self.run.init_from)
        # The average starts as a copy of the (possibly initialised) weights at the first update.
        self.ema = (AveragedModel(self.model, multi_avg_fn=ema_update(self.run.ema_decay, self.run.ema_warmup))
                    if self.run.ema_decay else None)
        self.optimizer = build_optimizer(self.model.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.steps_per_epoch, self.run.epochs)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.partial: dict[str, Any] | None = None  # the current epoch's progress, when inside one

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.config.data.num_workers
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
            generator=self.loader_generator if shuffle else torch.Generator().manual_seed(0),
            pin_memory=self.device.type == "cuda", persistent_workers=False, drop_last=False,
        )

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and exported: the moving average when enabled."""
        return self.ema.module if self.ema is not None and int(self.ema.n_averaged) > 0 else self.model

    def state_dict(self) -> dict[str, Any]:
        """``model_state`` holds the validated weights (the average with ``ema_decay``); the raw
        training weights then go to ``raw_model_state`` and the count of averaged steps to
        ``ema_n_averaged``."""
        name, model_config = model_metadata(self.model)
        def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        extra = {}
        if self.ema is not None:
            extra = {"raw_model_state": cpu(self.model), "ema_n_averaged": int(self.ema.n_averaged)}
        return {
            "model_name": name, "model_config": model_config,
            "model_state": cpu(self.eval_model), **extra,
            "optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.scheduler.state_dict(),
            "epoch": self.epoch, "global_step": self.global_step, "rng": capture_rng_state(),
            "history": self.history, "best": self.best, "train_config": config_to_dict(self.config),
            "data_fingerprint": self.fingerprint, "partial_epoch": self.partial,
        }

    def _load_same_model(self, path: str | Path, advice: str, free: tuple[str, ...] = ()) -> dict[str, Any]:
        """Read a checkpoint and check that it holds the configured model (name and config).

        The fields in :data:`training.networks.SPEED_ONLY_FIELDS` may always differ; so may those
        in ``free``.
        """
        ckpt = load_checkpoint(path)
        name, model_config = model_metadata(self.model)
        ignored = {*SPEED_ONLY_FIELDS, *free}
        theirs = ckpt["model_config"] if isinstance(ckpt["model_config"], dict) else {}
        differ = sorted(k for k in set(theirs) | set(model_config)
                        if k not in ignored and theirs.get(k) != model_config.get(k))
        if ckpt["model_name"] != name or differ:
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {model_config.get(k)!r} here" for k in differ)
            raise CheckpointError(path, f"checkpoint holds model {ckpt['model_name']!r} with another config than "
                                        f"the configured {name!r}" + (f" ({detail})" if detail else "")
                                        + f"; {advice}")
        return ckpt

    def init_weights(self, path: str | Path) -> None:
        """Load only the model weights of ``path`` (a checkpoint of the same model and config; the
        dropout rates and ``chunk_elements`` may differ: ``REGULARISATION_FIELDS`` and
        ``SPEED_ONLY_FIELDS`` of :mod:`training.networks`).

        Raises:
            CheckpointError: Unreadable checkpoint, another model, or weights that do not fit.
        """
        ckpt = self._load_same_model(path, "use a checkpoint of the same model settings",
                                     free=REGULARISATION_FIELDS)
        try:
            self.model.load_state_dict(ckpt["model_state"])
        except RuntimeError as exc:
            raise CheckpointError(path, f"weights do not fit the configured model: {exc}") from None
        logger.info("initialised weights from %s (epoch %s, best %s)", path, ckpt.get("epoch"), ckpt.get("best"))

    def resume(self, path: str | Path, force: bool = False) -> None:
        """Restore everything from a checkpoint written by this trainer.

        The schedule follows the current config: resuming with more ``train.epochs`` stretches it
        from the step reached (the run is then no longer the same as an uninterrupted one).

        Raises:
            CheckpointError: Unreadable checkpoint, or one of a different model.
            DataMismatchError: The checkpoint was trained on different data (unless ``force``).
        """
        ckpt = self._load_same_model(path, "resume with the same model settings")
        if ckpt.get("data_fingerprint") != self.fingerprint:
            if not force:
                raise DataMismatchError(path, "data fingerprint differs from the checkpoint's (different files, "
                                              "split or seeds); pass force to resume anyway")
            logger.warning("%s: resuming on data with a different fingerprint (forced)", path)
        self.model.load_state_dict(ckpt.get("raw_model_state", ckpt["model_state"]))
        if self.ema is not None:
            # Without a saved average (EMA switched on at resume) it restarts from these weights.
            self.ema.module.load_state_dict(ckpt["model_state"])
            self.ema.n_averaged.fill_(int(ckpt.get("ema_n_averaged", 0)))
        elif "raw_model_state" in ckpt:
            logger.warning("%s: resuming without ema_decay from a run that averaged its weights; "
                           "training continues from the raw weights", path)
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        self.history, self.best = list(ckpt.get("history", [])), ckpt.get("best")
        self.partial = ckpt.get("partial_epoch")
        if self.partial is not None and not 0 < self.partial["steps"] < self.steps_per_epoch:
            raise CheckpointError(path, f"checkpoint stopped after step {self.partial['steps']} of an epoch, but "
                                        f"epochs here have {self.steps_per_epoch} steps; resume with the "
                                        "checkpoint's batch_size and max_steps_per_epoch")
        restore_rng_state(ckpt["rng"])
        self._write_metrics_log()
        within = f" (+{self.partial['steps']} steps into epoch {self.epoch + 1})" if self.partial else ""
        logger.info("resumed from %s at epoch %d, step %d%s", path, self.epoch, self.global_step, within)

    def _write_metrics_log(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / METRICS, "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")

    def _save(self, record: dict[str, Any]) -> None:
        improved = self.best is None or record["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = {"epoch": record["epoch"], "val_acc": record["val_acc"], "val_loss": record["val_loss"]}
        state = self.state_dict()
        save_checkpoint(self.out_dir / LATEST, state)
        if improved:
            save_checkpoint(self.out_dir / BEST, state)
        with open(self.out_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- loop --------------------------------------------------------------------------------
    def _device_description(self) -> str:
        """What trained: ``cuda: <GPU name>`` or ``cpu: <N> threads``."""
        if self.device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.device)}"
        return f"{self.device.type}: {torch.get_num_threads()} threads"

    def _train_epoch(self) -> tuple[float, float, int, float]:
        """One epoch, or the rest of one when resumed inside it; returns the epoch's train loss,
        train accuracy, images seen and training seconds (all including the part before a resume)."""
        self.model.train()
        self.loader_generator.manual_seed(self.run.seed * 1_000_003 + self.epoch)
        self.augment_generator.manual_seed(self.run.seed * 1_000_003 + self.epoch + 500_000_000)
        done = self.partial or {"steps": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "time_s": 0.0,
                                "lr": self.optimizer.param_groups[0]["lr"]}
        if self.partial:
            self.augment_generator.set_state(self.partial["augment_rng"])
        total_loss, correct, seen = done["loss_sum"], done["correct"], done["seen"]
        start = time.perf_counter() - done["time_s"]
        every = self.run.checkpoint_every_steps
        bar = tqdm(total=self.steps_per_epoch, initial=done["steps"], desc=f"epoch {self.epoch + 1}/{self.run.epochs}",
                   disable=not self.run.progress, leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            if i < done["steps"]:
                continue  # trained on before the resume: same order, so skip (the batch is only read)
            loss, n_correct = self._train_step(x, y)
            total_loss += loss * y.shape[0]
            correct += n_correct
            seen += y.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
            if every and (i + 1) % every == 0 and i + 1 < self.steps_per_epoch:
                self.partial = {"steps": i + 1, "loss_sum": total_loss, "correct": correct, "seen": seen,
                                "time_s": time.perf_counter() - start, "lr": done["lr"],
                                "augment_rng": self.augment_generator.get_state()}
                save_checkpoint(self.out_dir / LATEST, self.state_dict())
        bar.close()
        self.partial = None
        return total_loss / max(1, seen), correct / max(1, seen), seen, time.perf_counter() - start

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.run.augment_rotation:
            angles = torch.rand(x.shape[0], generator=self.augment_generator, dtype=torch.float64) * (2 * math.pi)
            x = rotate_bilinear(x, angles.to(x.device)).clamp_(0.0, 1.0)
        if self.run.augment_d4:
            x = random_d4(x, self.augment_generator)
        if self.run.augment_hed > 0:
            x = hed_jitter(x, self.run.augment_hed, self.augment_generator)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.run.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.run.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.global_step += 1
        return float(loss.detach()), int((logits.detach().argmax(-1) == y).sum())

    def fit(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train from the current epoch to ``config.train.epochs``; returns the metrics history.

        One record per epoch (also a line of ``metrics.jsonl``): ``epoch``, ``step`` (optimizer
        steps so far), ``lr`` (the learning rate of the epoch's first step, so near 0 in a first
        epoch that starts a warm-up), ``train_loss`` and ``train_acc`` (over the epoch, raw weights),
        ``val_loss`` and ``val_acc`` (the averaged weights when ``ema_decay`` is set), ``time_s``
        (training and validation), ``images_per_s`` (training only) and ``device`` (what trained).

        Args:
            stop_after: Stop once this many epochs are complete (an interruption: the schedule
                still spans ``config.train.epochs``, and a resumed run finishes it exactly).
        """
        last = self.run.epochs if stop_after is None else min(stop_after, self.run.epochs)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.epoch == 0:
            self._write_metrics_log()
        logger.info("training on %s (amp %s), %d train / %d val images, %d steps per epoch",
                    self.device, self.amp_dtype, len(self.train_set), len(self.val_set), self.steps_per_epoch)
        while self.epoch < last:
            lr = self.partial["lr"] if self.partial else self.optimizer.param_groups[0]["lr"]
            train_loss, train_acc, seen, train_time = self._train_epoch()
            start = time.perf_counter() - train_time
            val = evaluate_loader(self.eval_model, self.val_loader, self.device, self.amp_dtype)
            self.epoch += 1
            record = {
                "epoch": self.epoch, "step": self.global_step, "lr": lr,
                "train_loss": train_loss, "train_acc": train_acc,
                "val_loss": val["loss"], "val_acc": val["accuracy"],
                "time_s": time.perf_counter() - start, "images_per_s": seen / max(train_time, 1e-9),
                "device": self._device_description(),
            }
            self.history.append(record)
            self._save(record)
            logger.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f img/s",
                        self.epoch, train_loss, train_acc, val["loss"], val["accuracy"], record["images_per_s"])
        return self.history
