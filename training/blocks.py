"""Blocks between attention layers. Everything here commutes with the group.

Axes: B batch, C channels, G group size, H W spatial. Feature maps are channels-last,
``[B, H, W, G, C]``: channel-wise linear maps and LayerNorm over channels act per (x, h), so they
commute with any permutation of positions and of the group axis.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.group_attention import GroupSelfAttention

__all__ = ["get_act_layer", "ChannelMLP", "TransformerBlock", "GroupMaxPool", "crop_spatial"]


def get_act_layer(name: str) -> type[nn.Module]:
    acts = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
    if name.lower() not in acts:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(acts)}")
    return acts[name.lower()]


def crop_spatial(x: torch.Tensor, crop: int) -> torch.Tensor:
    """Drop ``crop`` positions on every side of ``[B, H, W, ...]`` (symmetric, so equivariant)."""
    if crop == 0:
        return x
    return x[:, crop : x.shape[1] - crop, crop : x.shape[2] - crop]


class ChannelMLP(nn.Module):
    """Point-wise ``C -> C/2 -> C`` MLP with LayerNorms (the paper's block MLP)."""

    def __init__(self, dim: int, act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        hidden = max(1, dim // 2)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.fc2(self.act(self.norm1(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm group self-attention with a residual, then a channel MLP with a residual.

    ``out = crop(shortcut(x)) + drop(act(norm(attn(act(norm(x))))))``, then
    ``out = out + mlp(out)``. The attention layer computes its output only at the cropped
    positions; the shortcut is cropped to match.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        attn: GroupSelfAttention,
        act_layer: type[nn.Module] = nn.SiLU,
        value_drop: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.act = act_layer()
        self.attn = attn
        self.norm2 = nn.LayerNorm(out_dim)
        self.value_drop = nn.Dropout(value_drop)
        self.shortcut = nn.Linear(dim, out_dim) if dim != out_dim else nn.Identity()
        self.mlp = ChannelMLP(out_dim, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.act(self.norm1(x)))  # B, H', W', G, C_out
        y = self.value_drop(self.act(self.norm2(y)))
        out = y + self.shortcut(crop_spatial(x, self.attn.crop))
        return out + self.mlp(out)


class GroupMaxPool(nn.Module):
    """Spatial max pooling of ``[B, H, W, G, C]`` that stays exactly equivariant.

    Even sides: 2x2 windows, stride 2 (the grid of windows maps onto itself under D4). Odd
    sides: 3x3 windows, stride 2, no padding, so the windows cover rows ``[2i, 2i + 2]``, a set
    symmetric about the centre (a 2x2 pool on an odd side would drop the last row and column and
    break exactness: the paper's PCam network does that, 7 -> 3; ours pools 7 -> 3 with 3x3/2).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, g, c = x.shape
        if h != w:
            raise ValueError(f"GroupMaxPool needs a square input, got {h}x{w}")
        if h < 2:
            raise ValueError(f"cannot pool a {h}x{w} map")
        y = x.permute(0, 3, 4, 1, 2).reshape(b, g * c, h, w)  # B, G C, H, W
        y = F.max_pool2d(y, 2, 2) if h % 2 == 0 else F.max_pool2d(y, 3, 2)  # B, G C, H2, W2
        h2 = y.shape[-1]
        return y.view(b, g, c, h2, h2).permute(0, 3, 4, 1, 2)  # B, H2, W2, G, C

    @staticmethod
    def output_size(size: int) -> int:
        return size // 2 if size % 2 == 0 else (size - 3) // 2 + 1
