"""Group self-attention: a signal on Z^2 x| H to a signal on Z^2 x| H (paper Eq. 14).

Paper form (sum over query orientations h~, cost |H|^3 per position):

    out(x, h) = sum_{h~} sum_{(y, h')} softmax_{(y, h')}( q(x, h~) . (k(y, h') + rho(h^-1 (y - x), h^-1 h')) / sqrt(d) ) v(y, h')

Aligned form (``form="aligned"``): only ``h~ = h`` (cost |H|^2); equally equivariant, cheaper, and a
different model, so it is an option and never a silent substitute.

The sum over ``h~`` is taken over the attention probabilities before they touch the values, so
the value product costs |H|^2 like the aligned form.

Axes: B batch, C channels, G group size (h~ query, h output, h' key), H W spatial, X query
positions, P window offsets, J = P G' keys per query, nh heads, d head dim.
"""

from __future__ import annotations

from typing import Any

import torch

from training.attention_base import WindowedAttention
from training.attention_plan import FORMS
from training.encoding import GroupPositionalEncoding

__all__ = ["GroupSelfAttention", "FORMS"]


class GroupSelfAttention(WindowedAttention):
    """Group self-attention, local (odd window) or global, multi-head, paper or aligned form.

    Input ``[B, H, W, G, C]`` (channels last), output ``[B, H', W', G, out_dim]``. Keyword-only
    arguments: ``form`` and those of :class:`training.attention_base.WindowedAttention`.

    Args:
        form: ``"paper"`` (sum over query orientations) or ``"aligned"``.
        **kwargs: the arguments of :class:`training.attention_base.WindowedAttention`.
    """

    def __init__(self, *, form: str = "paper", **kwargs: Any) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        super().__init__(**kwargs)
        self.form = form
        self.pos_enc = GroupPositionalEncoding(self.head_dim, self.group, self.offsets)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", form={self.form}"

    def encoding_table(self) -> torch.Tensor:
        """The group-expanded encoding laid out for the GEMMs (constant once frozen).

        Paper form: ``[d, G P G']`` ordered ``(h, p, h')``; aligned form: ``[G, d, P G']``.
        """
        if self.frozen_table is not None:
            return self.frozen_table
        table = self.pos_enc()  # G, P, G', d
        g, d = table.shape[0], table.shape[-1]
        if self.form == "paper":
            return table.permute(3, 0, 1, 2).reshape(d, -1)  # d, G P G'
        return table.permute(0, 3, 1, 2).reshape(g, d, -1)  # G, d, P G'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, group_axis=True)
        b, h, w, g, _ = x.shape
        table = self.encoding_table()
        j = self.num_offsets * g
        per_query = g * g * j if self.form == "paper" else g * j
        out = self.attend(self.form, x, table, scores_per_query=per_query)  # B, X, G, nh d
        hc, wc = h - 2 * self.crop, w - 2 * self.crop
        return self.proj(out).view(b, hc, wc, g, self.out_dim)  # B, H', W', G, C_out
