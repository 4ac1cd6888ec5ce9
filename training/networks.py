"""GSA-Net architectures: one frozen config, one model class, a registry of paper variants.

Variants are named ``gsa_<dataset>_<group>`` (``gsa_rotmnist_r4``, ``gsa_pcam_r4m``) and reproduce
the paper's three configurations (Romero & Cordonnier 2021, Sec. 5 and App. C) for every group.
A checkpoint stores the variant name and ``dataclasses.asdict(config)``; :func:`model_from_config`
rebuilds the model from them without parsing any string.

The model takes images ``[B, C, H, W]`` scaled to [0, 1] and normalises them itself (``mean``,
``std`` of the config), so that training, evaluation and the exported graph see the same inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.attention_base import DEFAULT_CHUNK_ELEMENTS
from training.blocks import GroupMaxPool, TransformerBlock, get_act_layer
from training.group_attention import FORMS, GroupSelfAttention
from training.groups import GROUP_NAMES, get_group
from training.lifting import LiftingSelfAttention

__all__ = [
    "GSANetConfig",
    "GSANet",
    "register_model",
    "list_models",
    "get_config",
    "create_model",
    "model_from_config",
    "SPEED_ONLY_FIELDS",
    "REGULARISATION_FIELDS",
]

# Config fields that change speed and memory but not the function the weights compute: checkpoints
# resume or fine-tune across them (a run trained with GPU-sized chunks continues on a CPU).
SPEED_ONLY_FIELDS = ("chunk_elements",)
# Config fields that act only in training (dropout rates): fine-tuning may change them, resuming not.
REGULARISATION_FIELDS = ("input_drop", "pool_drop", "attn_drop", "value_drop")


@dataclass(frozen=True)
class GSANetConfig:
    """Architecture of a GSA-Net. ``dim`` is the lifting width; each layer's head dim is half
    its output width (as in the paper)."""

    group: str = "R4"
    in_chans: int = 1
    num_classes: int = 10
    img_size: int = 28
    input_pool: int = 1  # average-pool the input by this factor before lifting (coarser resolution)
    dim: int = 20
    num_heads: int = 9
    block_sizes: tuple[int, ...] = (2, 3)
    expansion: tuple[int, ...] = (1, 1)
    crops: tuple[int, ...] = (2, 0, 2, 1, 1)
    kernel_size: int | None = 5  # None: global attention
    window: str = "auto"
    form: str = "paper"
    norm_between_layers: bool = False
    pool_after_last_block: bool = False
    input_drop: float = 0.0
    pool_drop: float = 0.0
    attn_drop: float = 0.0
    value_drop: float = 0.0
    act: str = "silu"
    readout: str = "max"
    final_norm: bool = False
    whitening_scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    class_names: tuple[str, ...] = ()
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        get_group(self.group)  # raises on an unknown name
        if len(self.expansion) != len(self.block_sizes):
            raise ValueError(f"expansion {self.expansion} needs one entry per block {self.block_sizes}")
        if len(self.crops) != sum(self.block_sizes):
            raise ValueError(f"crops {self.crops} needs one entry per layer ({sum(self.block_sizes)})")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.readout not in ("max", "mean"):
            raise ValueError(f"readout must be 'max' or 'mean', got {self.readout!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean and std need {self.in_chans} entries (one per input channel)")
        if self.input_pool < 1 or self.img_size % self.input_pool:
            raise ValueError(f"input_pool {self.input_pool} must be a positive divisor of img_size {self.img_size}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} entries for {self.num_classes} classes")

    @classmethod
    def from_dict(cls, data: dict) -> "GSANetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GSANetConfig fields: {sorted(unknown)}")
        tuples = {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()})

    def labels(self) -> list[str]:
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]


class GSANet(nn.Module):
    """Lifting self-attention, transformer blocks of group self-attention with pooling between
    blocks, and an invariant readout.

    Outputs: per-orientation responses ``r[b, c, h] = sum_x class_map(x, h)`` and invariant
    logits ``max_h r`` (or the mean). Rotating the input by a grid-exact element permutes ``r``
    along ``h`` and leaves the logits unchanged.
    """

    def __init__(self, config: GSANetConfig, name: str = "gsa_custom"):
        super().__init__()
        self.name = name
        self.config = config
        cfg = config
        group = get_group(cfg.group)
        self.group = group
        act_layer = get_act_layer(cfg.act)
        # A k x k average pool tiles the square image exactly (k divides its side), so the tiling
        # maps onto itself under every D4 element and the pool commutes with the group.
        size = cfg.img_size // cfg.input_pool
        max_size = size if cfg.kernel_size is None else None
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        self.input_drop = nn.Dropout(cfg.input_drop)
        self.lifting = LiftingSelfAttention(
            dim=cfg.in_chans, out_dim=cfg.dim, num_heads=cfg.num_heads, head_dim=cfg.dim // 2, group=group,
            kernel_size=cfg.kernel_size, max_size=max_size, window=cfg.window, crop=0, attn_drop=cfg.attn_drop,
            chunk_elements=cfg.chunk_elements,
        )
        self.lifting_norm = nn.LayerNorm(cfg.dim)
        self.act = act_layer()
        layers: list[nn.Module] = []
        dim, crops = cfg.dim, iter(cfg.crops)
        for i, (depth, expansion) in enumerate(zip(cfg.block_sizes, cfg.expansion)):
            out_dim = dim * expansion
            for _ in range(depth):
                crop = next(crops)
                attn = GroupSelfAttention(
                    dim=dim, out_dim=out_dim, num_heads=cfg.num_heads, head_dim=out_dim // 2, group=group,
                    kernel_size=cfg.kernel_size, max_size=max_size, window=cfg.window, crop=crop,
                    attn_drop=cfg.attn_drop, form=cfg.form, chunk_elements=cfg.chunk_elements,
                )
                layers.append(TransformerBlock(dim, out_dim, attn, act_layer, cfg.value_drop))
                if cfg.norm_between_layers:
                    layers += [nn.LayerNorm(out_dim), act_layer()]
                size -= 2 * crop
                dim = out_dim
            if i < len(cfg.block_sizes) - 1 or cfg.pool_after_last_block:
                layers.append(GroupMaxPool())
                size = GroupMaxPool.output_size(size)
                if cfg.pool_drop > 0:
                    layers.append(nn.Dropout(cfg.pool_drop))
            if size < 1:
                raise ValueError(f"img_size {cfg.img_size} is too small for crops {cfg.crops} and pooling")
        self.layers = nn.Sequential(*layers)
        self.num_features = dim
        # A pre-norm residual stream grows with depth; without a norm before the head the summed
        # responses start tens of nats off (initial loss 20-30 on RotMNIST). LayerNorm over
        # channels acts pointwise, so it commutes with the group action.
        self.final_norm = nn.LayerNorm(dim) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(dim, cfg.num_classes, bias=False)
        self.out_size = size
        self._init_weights(cfg.whitening_scale)
        if cfg.final_norm:
            # Responses sum the class map over size^2 positions, which are strongly correlated:
            # scale the head by 1/size^2 so that the responses start as a spatial mean would
            # (logit std about 0.7 for RotMNIST R4, initial loss about 2.5, not 7.7 at 1/size or
            # 128 without the norm). Every other map keeps the whitening init.
            nn.init.normal_(self.head.weight, 0.0, cfg.whitening_scale * dim**-0.5 / size**2)

    def _init_weights(self, scale: float) -> None:
        # The paper's "whitening" init: N(0, scale^2 / fan_in) for every linear map, zero bias.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, scale * m.in_features**-0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected {self.config.in_chans} input channels, got {x.shape[1]}")
        if x.shape[2] != x.shape[3]:
            raise ValueError(f"expected square images (rotations must map them onto themselves), got {x.shape[2]}x{x.shape[3]}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> last hidden map ``[B, H', W', G, D]``."""
        self._check_input(x)
        x = (x - self.mean) / self.std
        if self.config.input_pool > 1:
            x = F.avg_pool2d(x, self.config.input_pool)  # B, C, H / k, W / k
        x = self.input_drop(x).permute(0, 2, 3, 1)  # B, H, W, C
        x = self.act(self.lifting_norm(self.lifting(x)))  # B, H, W, G, dim
        return self.final_norm(self.layers(x))

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits ``[B, K]``, orientation responses ``[B, K, G]`` and features ``[B, D, G]``."""
        feats = self.forward_features(x)  # B, H', W', G, D
        responses = self.head(feats).sum(dim=(1, 2)).transpose(1, 2)  # B, K, G
        logits = responses.amax(-1) if self.config.readout == "max" else responses.mean(-1)  # B, K
        features = feats.mean(dim=(1, 2)).transpose(1, 2)  # B, D, G
        return {"logits": logits, "orientation_responses": responses, "features": features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)["logits"]

    def attention_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (LiftingSelfAttention, GroupSelfAttention))]


# ---- registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[[], GSANetConfig]] = {}


def register_model(fn: Callable[[], GSANetConfig]) -> Callable[[], GSANetConfig]:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    return sorted(n for n in _REGISTRY if pattern in n)


def get_config(name: str, **overrides) -> GSANetConfig:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return dataclasses.replace(_REGISTRY[name](), **overrides)


def create_model(name: str, **overrides) -> GSANet:
    """Build a registered variant, with config fields overridden (``attn_drop=0.1``, ``form="aligned"``)."""
    return GSANet(get_config(name, **overrides), name=name)


def model_from_config(name: str, config: dict | GSANetConfig) -> GSANet:
    """Rebuild a model from a checkpoint's name and config dict."""
    cfg = config if isinstance(config, GSANetConfig) else GSANetConfig.from_dict(config)
    return GSANet(cfg, name=name)


_MNIST = dict(in_chans=1, num_classes=10, img_size=28, mean=(0.1307,), std=(0.3081,))
_CIFAR = dict(
    in_chans=3, num_classes=10, img_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
)
_PCAM = dict(
    in_chans=3, num_classes=2, img_size=96, mean=(0.7008, 0.5384, 0.6916), std=(0.2350, 0.2774, 0.2129),
    class_names=("normal", "tumor"),
)


def _rotmnist(group: str) -> GSANetConfig:
    # Paper: 20 channels, 9 heads, blocks [2, 3], crops [2, 0, 2, 1, 1], 5x5 windows (about 44.4k params for R4).
    return GSANetConfig(group=group, dim=20, num_heads=9, block_sizes=(2, 3), expansion=(1, 1),
                        crops=(2, 0, 2, 1, 1), final_norm=True, **_MNIST)


def _cifar10(group: str) -> GSANetConfig:
    # Paper: 96 channels, 9 heads, blocks [2, 2, 2], expansion [1, 2, 1], norm between layers,
    # dropout 0.3 after pooling, 0.2 on the input (about 3.0M params).
    return GSANetConfig(group=group, dim=96, num_heads=9, block_sizes=(2, 2, 2), expansion=(1, 2, 1),
                        crops=(0,) * 6, norm_between_layers=True, pool_drop=0.3, input_drop=0.2,
                        final_norm=True, **_CIFAR)


def _pcam(group: str) -> GSANetConfig:
    # Paper: 12 channels, 9 heads, blocks [0, 1, 2, 1], expansion [1, 2, 2, 2], crops [0, 2, 1, 1],
    # pooling after every block (about 207k params). The last pool sees 7x7: pooled 3x3/2 here.
    return GSANetConfig(group=group, dim=12, num_heads=9, block_sizes=(0, 1, 2, 1), expansion=(1, 2, 2, 2),
                        crops=(0, 2, 1, 1), norm_between_layers=True, pool_after_last_block=True,
                        final_norm=True, **_PCAM)


def _register_family(prefix: str, build: Callable[[str], GSANetConfig]) -> None:
    for group in GROUP_NAMES:
        def variant(group: str = group) -> GSANetConfig:
            return build(group)
        variant.__name__ = f"gsa_{prefix}_{group.lower()}"
        register_model(variant)


def _pcam48(group: str) -> GSANetConfig:
    # The paper's PCam widths at half the resolution: the 96x96 input (0.972 um/px) is average-pooled
    # 2x2 inside the net to 48x48 (1.944 um/px; the tumour centre is still 16x16). No crops (every
    # side stays even, so every pool is 2x2), the aligned form (cost |H|^2 instead of |H|^3). Measured
    # here: 4x fewer positions and the aligned form make R4M trainable on a 2-core CPU.
    return dataclasses.replace(_pcam(group), input_pool=2, crops=(0, 0, 0, 0), form="aligned")


_register_family("rotmnist", _rotmnist)
_register_family("cifar10", _cifar10)
_register_family("pcam", _pcam)
_register_family("pcam48", _pcam48)


@register_model
def gsa_tiny_r4() -> GSANetConfig:
    """A few-thousand-parameter R4 net on 16x16 inputs, for tests and smoke runs."""
    return GSANetConfig(group="R4", in_chans=1, num_classes=10, img_size=16, dim=8, num_heads=2,
                        block_sizes=(1, 1), expansion=(1, 1), crops=(1, 1), mean=(0.5,), std=(0.5,))
