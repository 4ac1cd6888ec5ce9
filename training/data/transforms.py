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

__all__ = ["rotate_bilinear", "rotate_quarter_turns", "random_angles", "random_d4", "hed_jitter", "RGB_FROM_HED"]


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


def random_d4(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each ``[N, C, H, W]`` square image under its own uniformly drawn element of D4 (a quarter
    turn ``k`` in 0..3, then a left-right mirror or not): exact on the grid, no interpolation."""
    n = images.shape[0]
    draws = torch.randint(0, 8, (n,), generator=generator)  # element index: k = d % 4, mirror = d >= 4
    out = images.clone()
    for d in range(1, 8):
        idx = (draws == d).nonzero().flatten().to(images.device)
        if idx.numel():
            part = rotate_quarter_turns(images[idx], d % 4)
            out[idx] = part.flip(-1) if d >= 4 else part
    return out


# Ruifrok & Johnston (2001) stain vectors (optical density per RGB channel) of haematoxylin, eosin
# and DAB, one per row, unit length; the same matrix scikit-image uses for ``rgb2hed``.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)


def hed_jitter(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Stain augmentation of RGB H&E images ``[N, 3, H, W]`` in [0, 1] (Tellez et al. 2018).

    Each image is unmixed into haematoxylin, eosin and DAB optical densities; each stain density
    ``s`` becomes ``a * s + b`` with ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-sigma, sigma)``
    drawn per image and stain; the result is mixed back to RGB and clamped to [0, 1].
    ``sigma = 0.05`` is the "HED-light" setting of Tellez et al. 2019.
    """
    if images.shape[1] != 3:
        raise ValueError(f"HED jitter needs RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
    n = images.shape[0]
    alpha = 1.0 + (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma  # N, 3 (stains)
    beta = (torch.rand(n, 3, generator=generator) * 2 - 1) * sigma  # N, 3
    rgb_from_hed = RGB_FROM_HED.to(images.device, images.dtype)
    hed_from_rgb = torch.linalg.inv(RGB_FROM_HED).to(images.device, images.dtype)
    od = -torch.log(images.clamp(min=1.0 / 255.0))  # N, 3 (rgb), H, W
    stains = torch.einsum("nchw,cs->nshw", od, hed_from_rgb)  # N, 3 (stains), H, W
    stains = stains * alpha.to(stains)[:, :, None, None] + beta.to(stains)[:, :, None, None]
    od = torch.einsum("nshw,sc->nchw", stains, rgb_from_hed)  # N, 3 (rgb), H, W
    return torch.exp(-od).clamp_(0.0, 1.0)
