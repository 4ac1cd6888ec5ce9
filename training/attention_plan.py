"""The plan of one attention call: what the kernels need besides ``q, k, v`` and the encoding table.

Axes: X query positions, P window offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionPlan", "FORMS"]

# Score forms of the kernels, and so of the group layer (the lifting layer is "paper" with one
# query orientation); see training.group_attention.
FORMS = ("paper", "aligned")


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The geometry and settings of one layer call, fixed before the kernels run.

    :meth:`training.attention_base.WindowedAttention.plan` builds it from the layer's window
    geometry (computed once per input size and device), the batch size (which sets the chunk size)
    and the training mode (dropout). Everything the kernels branch on is a Python constant, so
    ``forward`` never branches on tensor values and graph capture sees fixed chunks.

    Attributes:
        form: ``"paper"`` (scores for every query orientation, summed after the softmax) or
            ``"aligned"`` (only the query orientation equal to the output orientation).
        index: ``[X, P]`` int64, the flattened position, in the zero-padded key grid, of the key at
            window offset p of query position x.
        bias: ``[X, P]``, 0 for keys inside the image and -inf outside; ``None`` when no window
            leaves the image.
        row_outside: per query position, whether its window holds keys outside the image (chunks
            without any skip the bias).
        chunk: query positions per chunk of the chunked kernel (the fused kernel has no chunks).
        p_drop: dropout probability of the attention probabilities (0 outside training).
    """

    form: str
    index: torch.Tensor
    bias: torch.Tensor | None
    row_outside: tuple[bool, ...]
    chunk: int
    p_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        object.__setattr__(self, "row_outside", tuple(self.row_outside))  # frozen: a list could still change
        if len(self.row_outside) != self.index.shape[0]:
            raise ValueError(
                f"row_outside has {len(self.row_outside)} entries for {self.index.shape[0]} query positions"
            )

    def chunk_bias(self, start: int, stop: int) -> torch.Tensor | None:
        """``[stop - start, P]``: the bias of query positions ``start:stop``, or ``None`` when none
        of their windows leaves the image."""
        return self.bias[start:stop] if self.bias is not None and any(self.row_outside[start:stop]) else None
