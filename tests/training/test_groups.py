"""Group algebra: axioms, matrices, permutations, names."""

import itertools

import pytest
import torch

from training.groups import GROUP_NAMES, cyclic, dihedral, get_group

GROUPS = [get_group(n) for n in GROUP_NAMES]


@pytest.mark.parametrize("group", GROUPS, ids=GROUP_NAMES)
def test_group_axioms(group):
    e = group.index(0, 0)
    elems = range(group.order)
    for a in elems:
        assert group.compose(e, a) == a == group.compose(a, e)
        assert group.compose(a, group.inverse(a)) == e
    for a, b, c in itertools.product(elems, repeat=3):
        assert group.compose(group.compose(a, b), c) == group.compose(a, group.compose(b, c))


@pytest.mark.parametrize("group", GROUPS, ids=GROUP_NAMES)
def test_matrices_represent_the_group(group):
    for a, b in itertools.product(range(group.order), repeat=2):
        ab = group.matrix(a) @ group.matrix(b)
        torch.testing.assert_close(ab, group.matrix(group.compose(a, b)), atol=1e-12, rtol=0)
    for a in range(group.order):
        m = group.matrix(a)
        torch.testing.assert_close(m @ m.T, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
        assert torch.det(m).item() == pytest.approx(-1.0 if group.reflection(a) else 1.0)


@pytest.mark.parametrize("group", GROUPS, ids=GROUP_NAMES)
def test_left_regular_permutation_is_a_homomorphism(group):
    # acting with a then b on a signal equals acting with b*a... written as index maps:
    # (L_b L_a f)[h] = f[perm_a[perm_b[h]]] must equal (L_{ba} f)[h] = f[perm_{ba}[h]]
    for a, b in itertools.product(range(group.order), repeat=2):
        pa, pb = group.left_regular_permutation(a), group.left_regular_permutation(b)
        assert torch.equal(pa[pb], group.left_regular_permutation(group.compose(b, a)))


def test_element_order_convention():
    r4m = dihedral(4)
    assert [(d["angle"], d["reflection"]) for d in r4m.describe()] == [
        (0.0, False), (90.0, False), (180.0, False), (270.0, False),
        (0.0, True), (90.0, True), (180.0, True), (270.0, True),
    ]
    # a quarter turn maps (1, 0) to (0, 1): counter-clockwise
    torch.testing.assert_close(cyclic(4).act_on_points(1, torch.tensor([[1.0, 0.0]], dtype=torch.float64)),
                               torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    # the mirror flips v
    torch.testing.assert_close(r4m.act_on_points(4, torch.tensor([[1.0, 2.0]], dtype=torch.float64)),
                               torch.tensor([[1.0, -2.0]], dtype=torch.float64))


def test_grid_exact_elements():
    assert cyclic(8).grid_exact_elements() == [0, 2, 4, 6]
    assert cyclic(12).grid_exact_elements() == [0, 3, 6, 9]
    assert dihedral(4).grid_exact_elements() == list(range(8))
    assert cyclic(1).grid_exact_elements() == [0]


def test_names_and_factories_are_cached():
    assert get_group("r4m") is dihedral(4)
    assert get_group("Z2") is cyclic(1)
    assert get_group("Z2M") is dihedral(1)
    assert get_group("R8").order == 8 and get_group("R4M").order == 8


@pytest.mark.parametrize("bad", ["P4", "R", "R0", "SO2", "", "R4MM"])
def test_unknown_group_names_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown group"):
        get_group(bad)
