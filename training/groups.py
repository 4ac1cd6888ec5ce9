"""Finite subgroups H of O(2) acting on the plane, as used by GSA-Nets.

Names follow Romero & Cordonnier (ICLR 2021): ``Z2`` is the trivial group, ``R4``..``R16`` the
cyclic groups C4..C16, ``R4M`` the dihedral group D4 (rotations and mirrors) and ``Z2M`` the mirror
group D1.

Element order along the group axis (the one convention used everywhere, and recorded in model
cards): element ``i`` has rotation index ``r = i % n`` and reflection flag ``m = i // n``. It acts on a
point ``p`` as ``R(2 pi r / n) M^m p`` where ``M`` mirrors the second coordinate. So the ``n``
rotations come first, in counter-clockwise order starting at the identity, then the ``n`` mirrored
elements ``R_r M``.

Coordinates: a point is ``(u, v)`` with ``u`` pointing right (image column) and ``v`` pointing up
(minus the image row), so that a positive angle is a counter-clockwise rotation of the picture,
the same as ``torch.rot90(img, 1, dims=(-2, -1))`` and ``numpy.rot90``. ``M`` maps ``(u, v)`` to
``(u, -v)``: an up-down flip of the picture (``img.flip(-2)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

__all__ = ["Group", "cyclic", "dihedral", "get_group", "GROUP_NAMES"]


@dataclass(frozen=True)
class Group:
    """A finite rotation (and optionally mirror) group, ``C_n`` or ``D_n``.

    Attributes:
        name: paper name, e.g. ``"R4"`` or ``"R4M"``.
        n: number of rotations.
        mirror: whether the group contains the mirrors (dihedral) or not (cyclic).
    """

    name: str
    n: int
    mirror: bool

    @property
    def order(self) -> int:
        return self.n * (2 if self.mirror else 1)

    def __len__(self) -> int:
        return self.order

    # ---- elements -------------------------------------------------------------------------
    def element(self, i: int) -> tuple[int, int]:
        """Index -> (rotation index r, reflection flag m)."""
        if not 0 <= i < self.order:
            raise IndexError(f"group {self.name} has {self.order} elements, got index {i}")
        return i % self.n, i // self.n

    def index(self, r: int, m: int) -> int:
        return (m % 2) * self.n + (r % self.n)

    def angle(self, i: int) -> float:
        """Rotation angle of element ``i`` in radians, in [0, 2 pi)."""
        return 2 * math.pi * self.element(i)[0] / self.n

    def angle_degrees(self, i: int) -> float:
        return 360.0 * self.element(i)[0] / self.n

    def reflection(self, i: int) -> bool:
        return bool(self.element(i)[1])

    def compose(self, a: int, b: int) -> int:
        """Index of ``a * b`` (apply ``b`` first). Uses ``M R_s = R_{-s} M``."""
        ra, ma = self.element(a)
        rb, mb = self.element(b)
        return self.index(ra + (-rb if ma else rb), ma ^ mb)

    def inverse(self, a: int) -> int:
        r, m = self.element(a)
        return a if m else self.index(-r, 0)

    def is_grid_exact(self, i: int) -> bool:
        """Whether element ``i`` maps the pixel grid onto itself (multiples of 90 degrees, mirrors)."""
        return (4 * self.element(i)[0]) % self.n == 0

    def grid_exact_elements(self) -> list[int]:
        return [i for i in range(self.order) if self.is_grid_exact(i)]

    # ---- actions --------------------------------------------------------------------------
    def matrix(self, i: int) -> torch.Tensor:
        """2x2 float64 matrix of element ``i`` acting on ``(u, v)`` column vectors."""
        r, m = self.element(i)
        t = 2 * math.pi * r / self.n
        c, s = math.cos(t), math.sin(t)
        rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        if m:
            rot = rot @ torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
        # Snap entries within rounding of 0 or +-1 so that quarter turns and mirrors are exact.
        snapped = rot.round()
        return torch.where((rot - snapped).abs() < 1e-12, snapped, rot)

    def act_on_points(self, i: int, points: torch.Tensor) -> torch.Tensor:
        """Apply element ``i`` to points ``[..., 2]`` given as ``(u, v)``."""
        mat = self.matrix(i).to(points.dtype)
        return points @ mat.T

    def cayley(self) -> torch.Tensor:
        """``[G, G]`` long table, ``table[a, b] = index(a * b)``."""
        return torch.tensor(
            [[self.compose(a, b) for b in range(self.order)] for a in range(self.order)], dtype=torch.long
        )

    def left_regular_permutation(self, i: int) -> torch.Tensor:
        """Permutation of the group axis induced by acting with element ``i``.

        A signal ``f`` on the group transforms as ``(L_g f)(h) = f(g^-1 h)``; the returned index
        ``perm`` gives ``(L_g f)[..., h] = f[..., perm[h]]``.
        """
        gi = self.inverse(i)
        return torch.tensor([self.compose(gi, h) for h in range(self.order)], dtype=torch.long)

    def relative_index_table(self) -> torch.Tensor:
        """``[G, G]`` table ``t[h, h'] = index(h^-1 h')``: the group part of the encoding index."""
        return torch.tensor(
            [[self.compose(self.inverse(h), hp) for hp in range(self.order)] for h in range(self.order)],
            dtype=torch.long,
        )

    def describe(self) -> list[dict]:
        """Angle (degrees) and reflection of every element, in axis order (for model cards)."""
        return [
            {"index": i, "angle": self.angle_degrees(i), "reflection": self.reflection(i)}
            for i in range(self.order)
        ]


@cache
def cyclic(n: int) -> Group:
    """The rotation group C_n (``R{n}``; ``Z2`` for n = 1)."""
    if n < 1:
        raise ValueError(f"cyclic group needs n >= 1, got {n}")
    return Group("Z2" if n == 1 else f"R{n}", n, False)


@cache
def dihedral(n: int) -> Group:
    """The dihedral group D_n: n rotations and n mirrors (``R{n}M``; ``Z2M`` for n = 1)."""
    if n < 1:
        raise ValueError(f"dihedral group needs n >= 1, got {n}")
    return Group("Z2M" if n == 1 else f"R{n}M", n, True)


GROUP_NAMES = ("Z2", "Z2M", "R4", "R8", "R12", "R16", "R4M")


def get_group(name: str) -> Group:
    """Group from its paper name (``Z2``, ``Z2M``, ``R4``, ``R8``, ``R12``, ``R16``, ``R4M``, ``R{n}[M]``)."""
    key = name.strip().upper()
    if key == "Z2":
        return cyclic(1)
    if key == "Z2M":
        return dihedral(1)
    mirror = key.endswith("M")
    body = key[:-1] if mirror else key
    if body.startswith("R") and body[1:].isdigit() and int(body[1:]) >= 1:
        n = int(body[1:])
        return dihedral(n) if mirror else cyclic(n)
    raise ValueError(f"unknown group {name!r}: expected one of {', '.join(GROUP_NAMES)} (or R<n>, R<n>M)")
