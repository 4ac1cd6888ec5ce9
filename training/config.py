"""Training configuration: typed sections read from YAML, with ``key=value`` overrides.

A run is described by five sections (``model``, ``data``, ``optim``, ``schedule``, ``train``).
Unknown keys and values of the wrong type are refused with :class:`ConfigError`, naming the file
and the key, so a typo never trains a different model silently. Overrides use dotted keys and
YAML values: ``train.batch_size=64``, ``optim.lr=2e-3``, ``model.overrides.attn_drop=0.1``,
``schedule.milestones=[30,60]``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration that cannot be used: names the source (file or override) and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class ModelConfig:
    """A registered model variant and overrides of its config fields (``attn_drop``, ``form``)."""

    name: str = "gsa_rotmnist_r4"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which dataset, where, which splits; ``options`` go to the dataset reader.

    ``train_options`` override ``options`` for the training split only. With MNIST,
    ``train_options: {rotate: false}`` and ``train.augment_rotation`` draw every training digit's
    angle afresh at each epoch from its upright source, so it is interpolated once, as the
    validation digits are (the rotated digits rotated again would be interpolated twice).
    """

    name: str = "mnist"
    root: str = "../shared/data/mnist/mnist-train-10k.npz"
    train_split: str = "train"
    val_split: str = "val"
    options: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0


@dataclass
class OptimConfig:
    """``adam`` (L2 weight decay, as in the paper), ``adamw`` (decoupled) or ``sgd`` (momentum)."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step.

    ``constant``; ``multistep`` (multiply by ``gamma`` at each epoch of ``milestones``);
    ``cosine`` (linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr_ratio * lr``).
    ``warmup_epochs`` applies to every schedule.
    """

    name: str = "constant"
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class RunConfig:
    """How to run: epochs, batch sizes, seed, device, precision, output folder.

    ``init_from`` starts from the weights of another checkpoint of the same model (fine-tuning;
    optimizer, schedule and epoch start fresh). ``augment_rotation`` rotates every training image
    by its own angle, uniform in [0, 2 pi), bilinearly, on the training device; the angles come
    from a generator seeded with ``(seed, epoch)``, so resumed runs stay exact.
    ``augment_d4`` puts every training image under its own random element of D4 (quarter turns
    and mirrors, exact on the grid); ``augment_hed`` (e.g. 0.05) is the sigma of HED stain jitter
    for RGB H&E images (:func:`training.data.transforms.hed_jitter`); both use the same generator.
    ``ema_decay`` (e.g. 0.999) keeps an exponential moving average of the weights, updated after
    every optimizer step; validation, the best checkpoint and ``model_state`` then use the
    averaged weights (the raw ones are saved too, for resuming). ``ema_warmup`` (default on) ramps
    the decay up as ``min(ema_decay, (1 + t) / (10 + t))`` over the first updates ``t``, so that
    the average of a short run is not dominated by its first weights. ``checkpoint_every_steps``
    also writes the latest checkpoint every that many optimizer steps inside an epoch (resumed
    exactly, mid-epoch); the best checkpoint and the metrics log stay once an epoch.
    """

    epochs: int = 10
    batch_size: int = 8
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    out_dir: str = "runs/default"
    progress: bool = True
    max_steps_per_epoch: int | None = None
    init_from: str | None = None
    augment_rotation: bool = False
    augment_d4: bool = False
    augment_hed: float = 0.0
    ema_decay: float | None = None
    ema_warmup: bool = True
    checkpoint_every_steps: int | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)


_CHOICES = {
    ("optim", "name"): ("adam", "adamw", "sgd"),
    ("schedule", "name"): ("constant", "multistep", "cosine"),
    ("train", "amp"): ("auto", "bf16", "off"),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against annotation ``tp`` (and converted where lossless), else ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(where, "; ".join(errors))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(where, f"expected {len(args)} items, got {len(value)}")
        item_types = [args[0]] * len(value) if (origin is list or args[-1] is Ellipsis) else list(args)
        return origin(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(where, f"unsupported annotation {tp}")
    raise ConfigError(where, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(source, f"section {prefix or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(source, f"unknown keys {sorted(f'{prefix}{k}' for k in unknown)}; "
                                  f"{prefix.rstrip('.') or 'the config'} accepts {names}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, source, f"{prefix}{name}.")
            continue
        try:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
        except ConfigError as exc:
            raise ConfigError(source, f"{exc.source}: {exc.reason}") from None
        choices = _CHOICES.get((prefix.rstrip("."), name))
        if choices and kwargs[name] not in choices:
            raise ConfigError(source, f"{prefix}{name} must be one of {choices}, got {kwargs[name]!r}")
    return cls(**kwargs)


def _check_model(config: TrainConfig, source: str) -> None:
    from training.networks import GSANetConfig, get_config

    fields = {f.name for f in dataclasses.fields(GSANetConfig)}
    unknown = set(config.model.overrides) - fields
    if unknown:
        raise ConfigError(source, f"unknown model.overrides {sorted(unknown)}; GSANetConfig fields are {sorted(fields)}")
    hints = typing.get_type_hints(GSANetConfig)
    try:
        overrides = {k: _coerce(v, hints[k], f"model.overrides.{k}") for k, v in config.model.overrides.items()}
        config.model.overrides = overrides
        get_config(config.model.name, **overrides)
    except ConfigError as exc:
        raise ConfigError(source, f"{exc.source}: {exc.reason}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, f"model: {exc}") from None


def _check_values(config: TrainConfig, source: str) -> None:
    checks = [
        (config.train.epochs >= 1, "train.epochs must be >= 1"),
        (config.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (config.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= config.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (config.train.grad_clip is None or config.train.grad_clip > 0, "train.grad_clip must be > 0 or null"),
        (config.train.ema_decay is None or 0 < config.train.ema_decay < 1, "train.ema_decay must be in (0, 1) or null"),
        (config.train.checkpoint_every_steps is None or config.train.checkpoint_every_steps >= 1,
         "train.checkpoint_every_steps must be >= 1 or null"),
        (config.schedule.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (config.data.val_split != "test", "data.val_split must not be the test set"),
    ]
    for ok, reason in checks:
        if not ok:
            raise ConfigError(source, reason)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate a nested dict (as read from YAML) into a :class:`TrainConfig`."""
    config = _build(TrainConfig, data if data is not None else {}, source, "")
    _check_values(config, source)
    _check_model(config, source)
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), ready for YAML or a checkpoint."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


class YAMLLoader(yaml.SafeLoader):
    """Safe YAML with 1.2 booleans: only ``true``/``false`` are booleans, so ``amp: off`` or
    ``--set train.amp=off`` stays the string "off" (YAML 1.1 would read it as False)."""


YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`YAMLLoader`."""
    return yaml.load(text, Loader=YAMLLoader)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}", "expected key=value")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}", f"value is not valid YAML ({exc})") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}", f"{part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: Missing or unreadable file, invalid YAML, unknown keys, wrong types.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(source, f"cannot read config ({exc.strerror or exc})") from None
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(source, f"invalid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(source, f"top level must be a mapping, got {type(data).__name__}")
    if overrides:
        source = f"{source} with --set {' '.join(overrides)}"
    return config_from_dict(apply_overrides(data, overrides), source)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
