"""Exact equivariance of every layer and every registered network under the grid-exact elements,
the tests' power to catch a broken encoding index, and the measured error at 45 degrees."""

import math

import pytest
import torch

from training.blocks import GroupMaxPool, TransformerBlock
from training.data.transforms import rotate_bilinear
from training.equivariance import grid_exact_generators, layer_equivariance_error, network_equivariance_errors
from training.group_attention import FORMS, GroupSelfAttention
from training.groups import GROUP_NAMES, get_group
from training.lifting import LiftingSelfAttention
from training.networks import create_model, list_models

TOL = 1e-5
# (kernel_size, crop, window, input side): masked borders, cropped interior, disc window, global
# attention (a 2 * 5 - 1 window over a 5x5 input: every query sees the whole image)
GEOMETRIES = [(5, 0, "auto", 9), (3, 1, "square", 9), (5, 1, "disc", 9), (None, 0, "auto", 5)]
GEOMETRY_IDS = ["k5-border", "k3-crop1", "k5-disc", "global"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _lifting(group, kernel_size, crop, window, size=9):
    return LiftingSelfAttention(dim=3, out_dim=8, num_heads=2, head_dim=5, group=group, kernel_size=kernel_size,
                                max_size=size, window=window, crop=crop).eval()


def _group_layer(group, kernel_size, crop, window, form, size=9):
    return GroupSelfAttention(dim=6, out_dim=8, num_heads=2, head_dim=5, group=group, kernel_size=kernel_size,
                              max_size=size, window=window, crop=crop, form=form).eval()


@pytest.mark.parametrize("kernel_size,crop,window,size", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("group_name", GROUP_NAMES)
def test_lifting_layer_is_equivariant(group_name, kernel_size, crop, window, size):
    group = get_group(group_name)
    layer = _lifting(group, kernel_size, crop, window, size)
    assert layer_equivariance_error(layer, torch.randn(2, size, size, 3), group, lifting=True) < TOL


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kernel_size,crop,window,size", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("group_name", GROUP_NAMES)
def test_group_layer_is_equivariant(group_name, kernel_size, crop, window, size, form):
    group = get_group(group_name)
    layer = _group_layer(group, kernel_size, crop, window, form, size)
    x = torch.randn(2, size, size, group.order, 6)
    assert layer_equivariance_error(layer, x, group, lifting=False) < TOL


@pytest.mark.parametrize("group_name", GROUP_NAMES)
def test_blocks_are_equivariant(group_name):
    group = get_group(group_name)
    attn = GroupSelfAttention(dim=6, out_dim=12, num_heads=2, head_dim=6, group=group, kernel_size=3, crop=1)
    block = TransformerBlock(6, 12, attn).eval()
    assert layer_equivariance_error(block, torch.randn(2, 9, 9, group.order, 6), group, lifting=False) < TOL
    pool = GroupMaxPool()
    for size in (8, 7):  # 2x2 on even sides, 3x3/2 on odd ones
        assert layer_equivariance_error(pool, torch.randn(2, size, size, group.order, 4), group, lifting=False) == 0.0


def test_a_2x2_pool_on_an_odd_side_is_not_equivariant():
    """The reason for the 3x3/2 pool on odd sides: the paper's 7 -> 3 pooling fails this check."""
    group = get_group("R4")

    def floor_pool(x):
        b, h, w, g, c = x.shape
        y = torch.nn.functional.max_pool2d(x.permute(0, 3, 4, 1, 2).reshape(b, g * c, h, w), 2, 2)
        return y.view(b, g, c, h // 2, w // 2).permute(0, 3, 4, 1, 2)

    assert layer_equivariance_error(floor_pool, torch.randn(2, 7, 7, 4, 3), group, lifting=False) > 0.1


def _test_size(name: str) -> int | None:
    # Equivariance is a property of the architecture: CIFAR-10 nets are checked on 8x8 inputs
    # (8 -> 4 -> 2, every layer and pool still runs), PCam nets on 64x64 (the smallest side that
    # survives its crops and four pools), the half-resolution PCam nets on 32x32 (the input pool
    # included); RotMNIST nets at their native 28x28.
    if name.startswith("gsa_cifar10"):
        return 8
    if name.startswith("gsa_pcam48"):
        return 32  # pooled 2x2 at the input to 16, no crops: 16 -> 8 -> 4 -> 2 -> 1
    if name.startswith("gsa_pcam"):
        return 64
    return None


@pytest.mark.parametrize("name", list_models())
def test_every_registered_network_is_equivariant(name):
    size = _test_size(name)
    model = create_model(name, **({"img_size": size} if size else {})).eval()
    cfg = model.config
    x = torch.rand(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    # Every grid-exact element up to |H| = 8; for R12 and R16 (minutes per sweep in the paper form)
    # the generators of the grid-exact subgroup, which imply the rest.
    elements = None if model.group.order <= 8 else grid_exact_generators(model.group)
    err_responses, err_logits = network_equivariance_errors(model, x, elements)
    assert err_responses < TOL
    assert err_logits < TOL


# ---- the tests can fail: corrupt the encoding index or the acted offsets --------------------
def _right_relative(group):
    # h' h^-1 instead of h^-1 h': equal for abelian groups, wrong for the mirrors
    return torch.tensor([[group.compose(hp, group.inverse(h)) for hp in range(group.order)] for h in range(group.order)])


def _absolute(group):
    return torch.arange(group.order).repeat(group.order, 1)  # the key's own orientation


def _shifted(group):
    rel = group.relative_index_table().clone()
    rel[1:] = torch.roll(rel[1:], 1, dims=1)  # off by one for every output element but the identity
    return rel


INDEX_MUTATIONS = {"absolute": _absolute, "shifted": _shifted, "right-multiplied": _right_relative}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mutation", INDEX_MUTATIONS)
@pytest.mark.parametrize("group_name", ["R4", "R8", "R4M", "Z2M"])
def test_corrupted_group_index_is_caught(group_name, mutation, form):
    group = get_group(group_name)
    cayley = group.cayley()
    if mutation == "right-multiplied" and torch.equal(cayley, cayley.T):
        pytest.skip("h' h^-1 equals h^-1 h' in an abelian group")
    layer = _group_layer(group, 5, 0, "auto", form)
    x = torch.randn(2, 9, 9, group.order, 6)
    assert layer_equivariance_error(layer, x, group, lifting=False) < TOL  # control
    layer.pos_enc.relative_index = INDEX_MUTATIONS[mutation](group)
    assert layer_equivariance_error(layer, x, group, lifting=False) > 1e-3


def _unacted(acted):
    return acted[:1].expand_as(acted).clone()  # rho(p) for every h


def _forward_acted(group):
    # rho(h p) instead of rho(h^-1 p)
    def mutate(acted):
        return torch.stack([acted[group.inverse(h)] for h in range(group.order)])
    return mutate


@pytest.mark.parametrize("mutation", ["unacted", "forward"])
@pytest.mark.parametrize("group_name", ["R4", "R8", "R4M"])
@pytest.mark.parametrize("lifting", [True, False], ids=["lifting", "group"])
def test_corrupted_acted_offsets_are_caught(group_name, mutation, lifting):
    group = get_group(group_name)
    if lifting:
        layer, x = _lifting(group, 5, 0, "auto"), torch.randn(2, 9, 9, 3)
    else:
        layer, x = _group_layer(group, 5, 0, "auto", "paper"), torch.randn(2, 9, 9, group.order, 6)
    assert layer_equivariance_error(layer, x, group, lifting) < TOL  # control
    acted = layer.pos_enc.acted_offsets
    layer.pos_enc.acted_offsets = _unacted(acted) if mutation == "unacted" else _forward_acted(group)(acted)
    assert layer_equivariance_error(layer, x, group, lifting) > 1e-3


# ---- 45 degrees: approximate, measured -----------------------------------------------------
def _smooth_disc_images(n: int, size: int) -> torch.Tensor:
    """Sums of random Gaussian blobs, zero outside the inscribed disc (so rotation loses nothing)."""
    gen = torch.Generator().manual_seed(1)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    imgs = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(6):
            cy, cx = (torch.rand(2, generator=gen) - 0.5) * size * 0.6
            s = 1.5 + 2.5 * torch.rand(1, generator=gen)
            imgs[i, 0] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    disc = (yy**2 + xx**2) <= ((size - 1) / 2 - 1) ** 2
    return (imgs / imgs.amax(dim=(2, 3), keepdim=True)) * disc


def _amplify_encodings(model, factor: float):
    """Scale the positional MLPs' outputs so that attention is position-dominated, as in trained
    nets. At plain random init the content term dominates, every net (Z2 too) is nearly invariant
    and the comparison below would have no power."""
    with torch.no_grad():
        for layer in model.attention_layers():
            for mlp in (layer.pos_enc.row, layer.pos_enc.col):
                mlp.net[-1].weight.mul_(factor)
                mlp.net[-1].bias.mul_(factor)
    return model


def _response_error_45(name: str, **overrides) -> float:
    """Relative error of the orientation responses after a 45 degree rotation of the input,
    against the responses shifted by the 45 degree element (unshifted for Z2)."""
    torch.manual_seed(0)
    # Without the final LayerNorm: at random init it rescales each position's features and
    # drowns the difference the layers make (with it: Z2 6.5%, R8 6.1%, R16 aligned 6.2%).
    overrides = {"final_norm": False, **overrides}
    model = _amplify_encodings(create_model(name, **overrides).eval(), 10.0)
    group = model.group
    x = _smooth_disc_images(4, model.config.img_size)
    with torch.no_grad():
        before = model.forward_all(x)["orientation_responses"]
        after = model.forward_all(rotate_bilinear(x, math.pi / 4))["orientation_responses"]
    if group.order > 1:
        before = before[:, :, group.left_regular_permutation(group.index(group.n // 8, 0))]
    return float((after - before).norm() / before.norm())


# name, overrides, bound. R16 runs in the aligned form: the paper form costs minutes here.
# Measured on this machine (seeded, no final norm): Z2 7.6%, R8 3.3%, R16 (aligned) 5.2%.
CASES_45 = [("gsa_rotmnist_r8", {}, 0.05, 0.6), ("gsa_rotmnist_r16", {"form": "aligned"}, 0.08, 0.9)]


@pytest.mark.parametrize("name,overrides,bound,vs_z2", CASES_45, ids=["R8", "R16-aligned"])
def test_45_degree_error_is_bounded_and_below_z2(name, overrides, bound, vs_z2):
    z2 = _response_error_45("gsa_rotmnist_z2")
    err = _response_error_45(name, **overrides)
    assert err < bound, f"{name}: responses change by {err:.2%} under a 45 degree rotation"
    assert err < vs_z2 * z2, f"{name}: {err:.2%} against Z2's {z2:.2%}"
