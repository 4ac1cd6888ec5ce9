"""Lifting self-attention: a signal on Z^2 to a signal on Z^2 x| H (paper Eq. 13).

    out(x, h) = sum_{y in N(x)} softmax_y( q(x) . (k(y) + rho(h^-1 (y - x))) / sqrt(d) ) v(y)

Axes: B batch, C channels, G group size, H W spatial, X query positions, P window offsets,
nh heads, d head dim.
"""

from __future__ import annotations

import torch

from training.attention_base import DEFAULT_CHUNK_ELEMENTS, WindowedAttention
from training.encoding import LiftingPositionalEncoding
from training.groups import Group

__all__ = ["LiftingSelfAttention"]


class LiftingSelfAttention(WindowedAttention):
    """Lifting self-attention, local (odd window) or global, multi-head.

    Input ``[B, H, W, C]`` (channels last), output ``[B, H', W', G, out_dim]`` with
    ``H' = H - 2 crop``. See :class:`training.attention_base.WindowedAttention` for the arguments.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_heads: int,
        head_dim: int,
        group: Group,
        kernel_size: int | None = 5,
        max_size: int | None = None,
        window: str = "auto",
        crop: int = 0,
        attn_drop: float = 0.0,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        super().__init__(
            in_dim, out_dim, num_heads, head_dim, group, kernel_size, max_size, window, crop, attn_drop, chunk_elements
        )
        self.pos_enc = LiftingPositionalEncoding(head_dim, group, self.offsets)
        self.frozen_table: torch.Tensor | None = None

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
