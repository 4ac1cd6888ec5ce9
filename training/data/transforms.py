"""Image rotations: exact quarter turns and bilinear rotations by any angle.

Convention: a positive angle rotates the image content counter-clockwise as displayed (rows
going down), the same sense as ``torch.rot90(x, 1, dims=(-2, -1))``; a bilinear rotation by
90 degrees equals that quarter turn up to float rounding. Rotations are about the image centre,
and pixels that come from outside the image are zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rotate_bilinear", "rotate_quarter_turns", "random_angles"]


def rotate_bilinear(images: torch.Tensor, angles: torch.Tensor | float, chunk: int = 4096) -> torch.Tensor:
    """Rotate ``[N, C, H, W]`` images by ``angles`` (radians, one per image or one for all).

    Args:
        images: Float images ``[N, C, H, W]``.
        angles: Angles in radians, shape ``[N]`` or a scalar.
        chunk: Images per ``grid_sample`` call (bounds memory on large sets).
    """
    n = images.shape[0]
    angles = torch.as_tensor(angles, dtype=torch.float64, device=images.device)
    if angles.dim() == 0:
        angles = angles.expand(n)
    if angles.shape != (n,):
        raise ValueError(f"expected one angle or {n} angles, got shape {tuple(angles.shape)}")
    out = torch.empty_like(images)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        cos, sin = angles[sl].cos(), angles[sl].sin()  # N
        zero = torch.zeros_like(cos)
        # affine_grid maps output coords (x right, y down) to input coords: out(p) = in(R p)
        theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # N, 2, 3
        part = images[sl]
        grid = F.affine_grid(theta.to(part.dtype), list(part.shape), align_corners=False)  # N, H, W, 2
        out[sl] = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out


def rotate_quarter_turns(images: torch.Tensor, k: int) -> torch.Tensor:
    """Exact rotation of ``[..., H, W]`` images by ``k * 90`` degrees counter-clockwise."""
    return torch.rot90(images, k, dims=(-2, -1))


def random_angles(n: int, seed: int) -> torch.Tensor:
    """``n`` angles uniform in [0, 2 pi) (float64) from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64) * (2 * math.pi)
