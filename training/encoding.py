"""Group-expanded relative positional encodings (Romero & Cordonnier 2021, Sec. 4).

The encoding ``rho`` is a small MLP of continuous relative coordinates, so any rotation can act
on its argument without interpolation (the "steerable" property). A layer never evaluates
``rho`` at a raw offset ``p``: it evaluates the group-expanded table

    lifting:  E[h, p]     = rho(h^-1 p)
    group:    E[h, p, h'] = rho(h^-1 p, h^-1 h')

whose arguments are invariant when the group acts on ``x, y, h, h'`` together; this is what makes
the attention equivariant. The acted offsets ``h^-1 p`` and the relative indices ``h^-1 h'`` are
computed once at construction and kept as non-persistent buffers (``acted_offsets`` and
``relative_index``); tests corrupt them to prove the equivariance tests can fail.

Axes: G group size, P window offsets, d encoding (= head) dimension.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from training.groups import Group
from training.windows import coordinate_scale, offsets_to_uv

__all__ = ["CoordinateMLP", "LiftingPositionalEncoding", "GroupPositionalEncoding"]


class CoordinateMLP(nn.Module):
    """``1 -> hidden -> dim`` MLP of one continuous coordinate (LayerNorm and SiLU in between)."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, coord: torch.Tensor) -> torch.Tensor:
        return self.net(coord.unsqueeze(-1))  # [...] -> [..., dim]


def _acted_offsets(group: Group, offsets: torch.Tensor) -> torch.Tensor:
    """``[G, P, 2]`` float32 ``(u, v)`` of ``h^-1 p`` for every element ``h``, scaled to the window."""
    uv = offsets_to_uv(offsets) / coordinate_scale(offsets)  # P, 2
    acted = [group.act_on_points(group.inverse(h), uv) for h in range(group.order)]
    return torch.stack(acted).to(torch.float32)  # G, P, 2


class LiftingPositionalEncoding(nn.Module):
    """``E[h, p] = rho(h^-1 p)``: half the channels encode the row coordinate, half the column."""

    def __init__(self, dim: int, group: Group, offsets: torch.Tensor, hidden: int = 16):
        super().__init__()
        self.dim = dim
        self.row = CoordinateMLP(dim // 2, hidden)
        self.col = CoordinateMLP(dim - dim // 2, hidden)
        self.register_buffer("acted_offsets", _acted_offsets(group, offsets), persistent=False)

    def forward(self) -> torch.Tensor:
        u, v = self.acted_offsets.unbind(-1)  # G, P
        return torch.cat([self.row(v), self.col(u)], dim=-1)  # G, P, d


class GroupPositionalEncoding(nn.Module):
    """``E[h, p, h'] = [rho_row, rho_col](h^-1 p) ++ emb(h^-1 h')``.

    A third of the channels encode the row coordinate, a third the column, the rest the relative
    group element (an embedding table: the group is discrete).
    """

    def __init__(self, dim: int, group: Group, offsets: torch.Tensor, hidden: int = 16):
        super().__init__()
        spatial = dim // 3
        self.dim = dim
        self.row = CoordinateMLP(spatial, hidden)
        self.col = CoordinateMLP(spatial, hidden)
        self.group_embedding = nn.Embedding(group.order, dim - 2 * spatial)
        self.register_buffer("acted_offsets", _acted_offsets(group, offsets), persistent=False)
        self.register_buffer("relative_index", group.relative_index_table(), persistent=False)

    def forward(self) -> torch.Tensor:
        g, p = self.acted_offsets.shape[:2]
        u, v = self.acted_offsets.unbind(-1)  # G, P
        spatial = torch.cat([self.row(v), self.col(u)], dim=-1)  # G, P, 2 ds
        rel = self.group_embedding(self.relative_index)  # G, G', dg
        spatial = spatial.unsqueeze(2).expand(g, p, g, spatial.shape[-1])  # G, P, G', 2 ds
        rel = rel.unsqueeze(1).expand(g, p, g, rel.shape[-1])  # G, P, G', dg
        return torch.cat([spatial, rel], dim=-1)  # G, P, G', d
