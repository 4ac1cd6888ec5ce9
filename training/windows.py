"""Attention neighbourhoods: window offsets and gather indices.

A neighbourhood ``N(x) = x + W`` is equivariant only if the window ``W`` is invariant under the
group. A square odd window is invariant under D4 (the grid-exact elements); for C8 and finer the
default is a disc, invariant under D4 and as close to rotation invariant as a set of grid points
can be.

Offsets are stored twice: as pixel steps ``(drow, dcol)`` for gathering, and as ``(u, v)`` points
(``u = dcol``, ``v = -drow``, see :mod:`training.groups`) for the group action.
"""

from __future__ import annotations

import torch

from training.groups import Group

__all__ = ["window_offsets", "resolve_window_shape", "neighbour_index"]


def resolve_window_shape(shape: str, group: Group) -> str:
    """``"auto"`` -> square for groups whose elements are all grid-exact, disc otherwise."""
    if shape == "auto":
        return "square" if all(group.is_grid_exact(i) for i in range(group.order)) else "disc"
    if shape not in ("square", "disc"):
        raise ValueError(f"window shape must be 'square', 'disc' or 'auto', got {shape!r}")
    return shape


def window_offsets(kernel_size: int, shape: str = "square") -> torch.Tensor:
    """``[P, 2]`` long tensor of ``(drow, dcol)`` offsets, row-major, centre included.

    Args:
        kernel_size: odd side length of the window.
        shape: ``"square"`` (all k*k offsets) or ``"disc"`` (offsets within radius k/2).
    """
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer (the window needs a centre), got {kernel_size!r}")
    r = kernel_size // 2
    rng = torch.arange(-r, r + 1)
    drow, dcol = torch.meshgrid(rng, rng, indexing="ij")
    offsets = torch.stack([drow.reshape(-1), dcol.reshape(-1)], dim=-1)
    if shape == "disc":
        keep = (offsets.float() ** 2).sum(-1) <= (kernel_size / 2) ** 2 + 1e-9
        offsets = offsets[keep]
    elif shape != "square":
        raise ValueError(f"window shape must be 'square' or 'disc', got {shape!r}")
    return offsets


def offsets_to_uv(offsets: torch.Tensor) -> torch.Tensor:
    """``(drow, dcol)`` -> ``(u, v)`` float64 points."""
    return torch.stack([offsets[:, 1], -offsets[:, 0]], dim=-1).to(torch.float64)


def neighbour_index(
    height: int, width: int, offsets: torch.Tensor, crop: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gather indices into a zero-padded, flattened feature map, and the out-of-image mask.

    Queries sit at the interior positions ``[crop, H - crop) x [crop, W - crop)``; keys at
    ``query + offset``. The feature map is padded by ``pad`` on every side so that every key has a
    slot; keys outside the image get ``mask = True`` (excluded from the softmax).

    Returns:
        index: ``[X, P]`` long, flat indices into the padded ``(H + 2 pad) * (W + 2 pad)`` map.
        outside: ``[X, P]`` bool, True where the key lies outside the image.
        pad: the padding used.
    """
    if 2 * crop >= min(height, width):
        raise ValueError(f"crop {crop} leaves nothing of a {height}x{width} input")
    pad = max(0, int(offsets.abs().max()) - crop)
    wp = width + 2 * pad
    rows = torch.arange(crop, height - crop)
    cols = torch.arange(crop, width - crop)
    qr, qc = torch.meshgrid(rows, cols, indexing="ij")
    qr, qc = qr.reshape(-1, 1), qc.reshape(-1, 1)  # X, 1
    kr = qr + offsets[:, 0].view(1, -1)  # X, P
    kc = qc + offsets[:, 1].view(1, -1)  # X, P
    outside = (kr < 0) | (kr >= height) | (kc < 0) | (kc >= width)
    index = (kr + pad) * wp + (kc + pad)
    return index, outside, pad


def coordinate_scale(offsets: torch.Tensor) -> float:
    """Half-width of the window: coordinates fed to the positional MLP are divided by it, so that
    the axis-aligned offsets span [-1, 1] (as in the paper)."""
    return float(max(1, int(offsets.abs().max())))
