"""The group acting on images and on signals over Z^2 x| H, and equivariance checks.

Only grid-exact elements (multiples of 90 degrees, mirrors) act on pixel arrays without
interpolation; ``act_on_spatial`` refuses the others.
"""

from __future__ import annotations

import torch

from training.groups import Group

__all__ = [
    "act_on_spatial",
    "act_on_group_signal",
    "relative_error",
    "layer_equivariance_error",
    "network_equivariance_errors",
    "grid_exact_generators",
]


def act_on_spatial(x: torch.Tensor, group: Group, element: int, dims: tuple[int, int]) -> torch.Tensor:
    """``(T_g x)(p) = x(g^-1 p)`` on the two spatial dims ``(row, col)`` of ``x``."""
    if not group.is_grid_exact(element):
        raise ValueError(
            f"element {element} of {group.name} ({group.angle_degrees(element):.1f} deg) is not grid-exact; "
            "rotate with interpolation instead"
        )
    r, m = group.element(element)
    if m:
        x = x.flip(dims[0])  # M: (u, v) -> (u, -v), an up-down flip
    quarter_turns = (4 * r) // group.n
    return torch.rot90(x, quarter_turns, dims=dims)


def act_on_group_signal(
    x: torch.Tensor, group: Group, element: int, spatial_dims: tuple[int, int] | None, group_dim: int
) -> torch.Tensor:
    """``(L_g f)(p, h) = f(g^-1 p, g^-1 h)``; ``spatial_dims=None`` for signals without space."""
    if spatial_dims is not None:
        x = act_on_spatial(x, group, element, spatial_dims)
    perm = group.left_regular_permutation(element).to(x.device)
    return x.index_select(group_dim, perm)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: the relative error used by every equivariance test."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def layer_equivariance_error(layer, x, group, lifting: bool) -> float:
    """Largest relative error of ``layer(T_g x)`` against ``L_g layer(x)`` over the grid-exact elements.

    ``x`` is channels-last: ``[B, H, W, C]`` (lifting) or ``[B, H, W, G, C]``.
    """
    with torch.no_grad():
        y = layer(x)
        worst = 0.0
        for e in group.grid_exact_elements():
            xt = act_on_spatial(x, group, e, (1, 2)) if lifting else act_on_group_signal(x, group, e, (1, 2), 3)
            expected = act_on_group_signal(y, group, e, (1, 2), 3)
            worst = max(worst, relative_error(layer(xt), expected))
    return worst


def grid_exact_generators(group: Group) -> list[int]:
    """Generators of the grid-exact subgroup: the quarter turn (if any) and the mirror (if any).

    Equivariance under generators implies it under every product of them, so checking these is
    enough when a full sweep is too costly (large groups on large nets).
    """
    gens = []
    if group.n % 4 == 0:
        gens.append(group.index(group.n // 4, 0))
    if group.mirror:
        gens.append(group.index(0, 1))
    return gens


def network_equivariance_errors(model, x, elements: list[int] | None = None) -> tuple[float, float]:
    """(responses error, logits error) over ``elements`` (default: every grid-exact element) for
    images ``[B, C, H, W]``."""
    group = model.group
    with torch.no_grad():
        out = model.forward_all(x)
        worst_r = worst_l = 0.0
        for e in group.grid_exact_elements() if elements is None else elements:
            o = model.forward_all(act_on_spatial(x, group, e, (2, 3)))
            perm = group.left_regular_permutation(e)
            worst_r = max(worst_r, relative_error(o["orientation_responses"], out["orientation_responses"][:, :, perm]))
            worst_l = max(worst_l, relative_error(o["logits"], out["logits"]))
    return worst_r, worst_l
