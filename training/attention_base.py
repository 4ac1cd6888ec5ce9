"""Shared machinery of the local self-attention layers: projections, windows, chunking.

Axes: B batch, C channels, G group size, H W spatial, X query positions (the cropped interior),
P window offsets, J = P * G' keys per query, nh heads, d head dim.

On the CPU the attention runs in the fused kernel (:mod:`training.fused_attention`), one query
position at a time, with no score tensor at all. Elsewhere (GPUs, ONNX export, or
``GSA_FUSED_ATTENTION=0``) memory is bounded by computing the attention for a chunk of query
positions at a time (all of the batch, heads and group elements); the backward pass recomputes
each chunk's scores (:mod:`training.attention_kernels`), so no score tensor outlives its chunk.
``chunk_elements`` bounds the number of scores a chunk holds.

The layers share one keyword-only constructor, :class:`WindowedAttention`'s; a subclass adds only
its own arguments (the group layer's ``form``). Each call hands the kernels one
:class:`training.attention_plan.AttentionPlan` (:meth:`WindowedAttention.plan`).
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.attention_kernels import padded_keys, projected_window_attention
from training.attention_plan import AttentionPlan
from training.groups import Group
from training.windows import neighbour_index, resolve_window_shape, window_offsets

__all__ = ["WindowedAttention", "DEFAULT_CHUNK_ELEMENTS"]

# Scores per chunk of the chunked kernel (the fused CPU kernel has no chunks): 1 MiB in float32,
# inside a 2 MiB L2 cache. Measured with the chunked kernel on this project's 2-core EPYC, the
# R4 training step at batch 8 ran at 7.8-8.3 images/s with 1 << 18 against 7.5-7.8 with 1 << 20
# and 6.2-6.3 with 1 << 22 (inference at batch 64: no difference); GPUs want far larger chunks
# (the GPU runs used 1 << 24).
DEFAULT_CHUNK_ELEMENTS = 1 << 18

# (index [X, P], bias [X, P] or None, pad, per query position "has keys outside the image")
Geometry = tuple[torch.Tensor, torch.Tensor | None, int, tuple[bool, ...]]


class WindowedAttention(nn.Module):
    """Base of lifting and group self-attention over a (local or global) window.

    Every argument is keyword-only; subclasses pass these through and add their own.

    Args:
        dim: input channels C.
        out_dim: output channels.
        num_heads: nh.
        head_dim: d, the channels per head of queries, keys, values and the encoding.
        group: the group H.
        kernel_size: odd window side; ``None`` for global attention over a ``max_size`` image
            (implemented as a ``2 * max_size - 1`` window with everything outside masked).
        max_size: largest input side, needed for global attention.
        window: ``"square"``, ``"disc"`` or ``"auto"`` (square when every element is grid-exact).
        crop: positions dropped on every side of the output; queries are only computed inside.
        attn_drop: dropout on the attention probabilities.
        chunk_elements: upper bound of scores held at once (see module docstring).
    """

    def __init__(
        self,
        *,
        dim: int,
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
    ) -> None:
        super().__init__()
        if kernel_size is None:
            if max_size is None:
                raise ValueError("global attention (kernel_size=None) needs max_size, the largest input side")
            kernel_size = 2 * max_size - 1
            window = "square"
        if crop < 0:
            raise ValueError(f"crop must be >= 0, got {crop}")
        self.dim = dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.group = group
        self.kernel_size = kernel_size
        self.window = resolve_window_shape(window, group)
        self.crop = crop
        self.chunk_elements = chunk_elements
        self.chunk_queries: int | None = None  # fixed chunk size (set for export); None: from budget
        self.scale = 1.0 / math.sqrt(head_dim)
        offsets = window_offsets(kernel_size, self.window)
        self.register_buffer("offsets", offsets, persistent=False)  # P, 2 (drow, dcol)
        inner = num_heads * head_dim
        self.query = nn.Linear(dim, inner)
        self.key = nn.Linear(dim, inner)
        self.value = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, out_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.frozen_table: torch.Tensor | None = None  # the encoding table as a constant (set for export)
        self._geometry: dict[tuple[int, int, str], Geometry] = {}

    @property
    def num_offsets(self) -> int:
        return self.offsets.shape[0]

    def extra_repr(self) -> str:
        return (
            f"{self.dim} -> {self.out_dim}, group={self.group.name}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, window={self.window}{self.kernel_size}, crop={self.crop}"
        )

    def _check_input(self, x: torch.Tensor, group_axis: bool) -> None:
        want = 5 if group_axis else 4
        layout = "[B, H, W, G, C]" if group_axis else "[B, H, W, C]"
        if x.dim() != want:
            raise ValueError(f"{type(self).__name__} expects a {want}-d input {layout}, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects {self.dim} input channels, got {x.shape[-1]}")
        if group_axis and x.shape[3] != self.group.order:
            raise ValueError(
                f"{type(self).__name__} expects a group axis of {self.group.order} ({self.group.name}), got {x.shape[3]}"
            )
        if x.shape[1] != x.shape[2]:
            raise ValueError(
                f"{type(self).__name__} needs a square input (rotations map it onto itself), got {x.shape[1]}x{x.shape[2]}"
            )
        if x.shape[1] - 2 * self.crop < 1:
            raise ValueError(f"input {x.shape[1]}x{x.shape[2]} is too small for crop {self.crop}")

    def geometry(self, height: int, width: int, device: torch.device) -> Geometry:
        """Cached ``(index [X, P], bias [X, P] or None, pad, per-query "has outside keys")``.

        Computed once per input size from constants, so ``forward`` never branches on tensor values.
        """
        key = (height, width, str(device))
        if key not in self._geometry:
            index, outside, pad = neighbour_index(height, width, self.offsets.cpu(), self.crop)
            bias = None
            if bool(outside.any()):
                bias = torch.zeros(outside.shape).masked_fill(outside, float("-inf")).to(device)
            self._geometry[key] = (index.to(device), bias, pad, tuple(outside.any(dim=1).tolist()))
        return self._geometry[key]

    def plan(self, form: str, x: torch.Tensor, scores_per_query: int) -> AttentionPlan:
        """The kernels' plan for one call on ``x``: the geometry of its size, a chunk size for its
        batch (``chunk_queries`` when fixed), dropout when training.

        Args:
            form: the kernel's score form (the lifting layer is ``"paper"`` with one query orientation).
            x: the layer input ``[B, H, W, G, C]``.
            scores_per_query: scores one query position holds per image and head.
        """
        b, height, width = x.shape[:3]
        index, bias, _, row_outside = self.geometry(height, width, x.device)
        n = self.chunk_queries or max(1, self.chunk_elements // max(1, b * self.num_heads * scores_per_query))
        p_drop = self.attn_drop.p if self.training else 0.0
        return AttentionPlan(form=form, index=index, bias=bias, row_outside=row_outside, chunk=n, p_drop=p_drop)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries at the interior, keys and values everywhere (zero-padded, flattened).

        Args:
            x: ``[B, H, W, G, C]`` (``G = 1`` for the lifting layer).

        Returns:
            q ``[B, nh, X, G, d]`` (already scaled by 1/sqrt(d)), k and v ``[B, nh, Hp*Wp, G, d]``.
        """
        return self._project(x, *self.projection_params())

    def projection_params(self) -> list[torch.Tensor]:
        """Weights and biases of the query, key and value maps, in :meth:`_project`'s order."""
        return [self.query.weight, self.query.bias, self.key.weight, self.key.bias, self.value.weight, self.value.bias]

    def _project(self, x, wq, bq, wk, bk, wv, bv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project` as a pure function of the input and the weights (recomputed backward)."""
        b, h, w, g, _ = x.shape
        c, nh, d = self.crop, self.num_heads, self.head_dim
        pad = self.geometry(h, w, x.device)[2]
        xq = x[:, c : h - c, c : w - c]  # B, H', W', G, C
        q = F.linear(xq, wq, bq) * self.scale  # B, H', W', G, nh d
        q = q.view(b, -1, g, nh, d).permute(0, 3, 1, 2, 4)  # B, nh, X, G, d

        def keys(weight, bias):  # separate tensors, so that their gradients are too
            t = F.linear(x, weight, bias).view(b, h, w, g, nh, d)  # B, H, W, G, nh, d
            return padded_keys(x, t, pad)  # B, nh, Hp Wp, G, d, laid out for the kernel that runs

        return q, keys(wk, bk), keys(wv, bv)

    def attend(
        self,
        form: str,
        x: torch.Tensor,
        table: torch.Tensor,
        scores_per_query: int,
    ) -> torch.Tensor:
        """Projections and chunked attention (see :mod:`training.attention_kernels`), heads merged.

        Args:
            x: the layer input ``[B, H, W, G, C]`` (``G = 1`` for the lifting layer).

        Returns:
            ``[B, X, G_out, nh d]``.

        When gradients are needed, ``q, k, v`` are not kept for the backward pass but recomputed
        from ``x`` there (:class:`training.attention_kernels.ProjectedWindowAttention`).
        """
        b, height, width = x.shape[:3]
        nh = self.num_heads
        x_total = (height - 2 * self.crop) * (width - 2 * self.crop)
        plan = self.plan(form, x, scores_per_query)
        out = projected_window_attention(x, self.projection_params(), self._project, table, plan)  # B, nh, X, G, d
        return out.permute(0, 2, 3, 1, 4).reshape(b, x_total, out.shape[3], nh * out.shape[-1])  # B, X, G, nh d
