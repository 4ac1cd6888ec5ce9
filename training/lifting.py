"""Lifting self-attention: a signal on Z^2 to a signal on Z^2 x| H (paper Eq. 13).

    out(x, h) = sum_{y in N(x)} softmax_y( q(x) . (k(y) + rho(h^-1 (y - x))) / sqrt(d) ) v(y)

Axes: B batch, C channels, G group size, H W spatial, X query positions, P window offsets,
nh heads, d head dim.
"""

from __future__ import annotations

from typing import Any

import torch

from training.attention_base import WindowedAttention
from training.encoding import LiftingPositionalEncoding

__all__ = ["LiftingSelfAttention"]


class LiftingSelfAttention(WindowedAttention):
    """Lifting self-attention, local (odd window) or global, multi-head.

    Input ``[B, H, W, C]`` (channels last), output ``[B, H', W', G, out_dim]`` with
    ``H' = H - 2 crop``. The arguments (keyword-only) are those of
    :class:`training.attention_base.WindowedAttention`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pos_enc = LiftingPositionalEncoding(self.head_dim, self.group, self.offsets)

    def encoding_table(self) -> torch.Tensor:
        """``[d, G P]``: the group-expanded encoding laid out for one GEMM (constant once frozen)."""
        if self.frozen_table is not None:
            return self.frozen_table
        table = self.pos_enc()  # G, P, d
        return table.permute(2, 0, 1).reshape(self.head_dim, -1)  # d, G P

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, group_axis=False)
        b, h, w, _ = x.shape
        g = self.group.order
        table = self.encoding_table()
        # The lifting layer is the paper kernel with a single query orientation (Gq = 1).
        out = self.attend("paper", x.unsqueeze(3), table, scores_per_query=g * self.num_offsets)  # B, X, G, nh d
        hc, wc = h - 2 * self.crop, w - 2 * self.crop
        return self.proj(out).view(b, hc, wc, g, self.out_dim)  # B, H', W', G, C_out
