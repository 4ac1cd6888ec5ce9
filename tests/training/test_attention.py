"""The chunked attention kernels: gradients against autograd, chunk-size independence, gradient
flow through whole networks, and clear errors for bad input."""

import pytest
import torch

from training.attention_kernels import (WindowAttention, _gather, _mask_into, _traceable_attention, _Workspace,
                                        attention_scores)
from training.attention_plan import AttentionPlan
from training.group_attention import GroupSelfAttention
from training.groups import get_group
from training.lifting import LiftingSelfAttention
from training.networks import GSANetConfig, create_model
from training.windows import neighbour_index, window_offsets


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["chunked", "fused"])
def attention_kernel(request, monkeypatch):
    """The chunked kernel (what GPUs run) and the fused CPU kernel (training.fused_attention)."""
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "0" if request.param == "chunked" else "1")
    return request.param


def _reference(form, q, k, v, table, index, bias):
    """Plain autograd over a single chunk: the same maths, no hand-written backward."""
    idx = index.reshape(-1)
    kw, vw = _gather(k, idx, index.shape[0]), _gather(v, idx, index.shape[0])
    a = torch.softmax(attention_scores(form, q, kw, table, bias), dim=-1)
    if form == "paper":
        a = a.sum(dim=3)
    return a @ vw


def _inputs(form, gq, g, size=6, kernel=5, crop=0):
    offsets = window_offsets(kernel)
    index, outside, pad = neighbour_index(size, size, offsets, crop)
    bias = torch.zeros(outside.shape, dtype=torch.float64).masked_fill(outside, float("-inf"))
    b, nh, d, p = 2, 3, 4, offsets.shape[0]
    q = torch.randn(b, nh, index.shape[0], gq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, nh, (size + 2 * pad) ** 2, gq, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    j = p * gq
    shape = (d, g * j) if form == "paper" else (g, d, j)
    table = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return q, k, v, table, index, bias, tuple(outside.any(dim=1).tolist())


def _plan(form, index, bias, rows, chunk, p_drop=0.0):
    return AttentionPlan(form=form, index=index, bias=bias, row_outside=rows, chunk=chunk, p_drop=p_drop)


# (form, query orientations, output orientations): lifting is the paper kernel with Gq = 1
KERNEL_CASES = [("paper", 4, 4), ("paper", 1, 8), ("aligned", 4, 4), ("paper", 8, 8)]


@pytest.mark.parametrize("form,gq,g", KERNEL_CASES, ids=["paper-R4", "lifting-R8", "aligned-R4", "paper-R8"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_hand_written_backward_matches_autograd(form, gq, g, chunk, attention_kernel):
    q, k, v, table, index, bias, rows = _inputs(form, gq, g)
    out = WindowAttention.apply(q, k, v, table, _plan(form, index, bias, rows, chunk))
    ref = _reference(form, q, k, v, table, index, bias)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v, table), grad_out)
    theirs = torch.autograd.grad(ref, (q, k, v, table), grad_out)
    for name, a, b in zip("q k v table".split(), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("form,gq,g", [("paper", 2, 2), ("aligned", 2, 2)])
def test_backward_with_attention_dropout_passes_gradcheck(form, gq, g, attention_kernel):
    q, k, v, table, index, bias, rows = _inputs(form, gq, g, size=4, kernel=3)
    plan = _plan(form, index, bias, rows, 5, p_drop=0.3)

    def fn(q, k, v, table):
        torch.manual_seed(5)  # the same masks on every call
        return WindowAttention.apply(q, k, v, table, plan)

    small = [t.detach()[:1, :1].clone().requires_grad_() for t in (q, k, v)] + [table]
    assert torch.autograd.gradcheck(fn, tuple(small), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_unbiased_reproducible_and_uncorrelated(p):
    """The CPU mask (four 16-bit lanes per 64-bit draw): kept with probability 1 - p, the kept
    entries scaled so that the mask's mean is 1; the same seed gives the same mask, another seed
    another; neighbouring entries (lanes of one draw) are independent."""
    shape = (8, 9, 2, 4, 4, 100)  # a chunk of the RotMNIST R4 net at batch 8: 230,400 entries
    ws = _Workspace(torch.empty(0))
    mask = _mask_into(ws, shape, p, seed=11).clone()
    n = mask.numel()
    kept = mask > 0
    assert set(mask.unique().tolist()) == {0.0, mask.max().item()}
    assert mask.max().item() == pytest.approx(1 / (1 - p), rel=1e-4)
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    assert abs(mask.mean().item() - 1.0) < 5 * sigma / (1 - p)
    lanes = kept.view(-1, 4).float()  # the four lanes of each draw
    for lane in range(4):
        assert abs(lanes[:, lane].mean().item() - (1 - p)) < 5 * 2 * sigma
    both = (lanes[:, 0] * lanes[:, 1]).mean().item()  # P(kept, kept) = (1 - p)^2 if independent
    assert abs(both - (1 - p) ** 2) < 5 * 2 * sigma
    assert torch.equal(_mask_into(_Workspace(torch.empty(0)), shape, p, seed=11), mask)
    assert not torch.equal(_mask_into(_Workspace(torch.empty(0)), shape, p, seed=12), mask)


@pytest.mark.parametrize("form", ["paper", "aligned"])
def test_output_does_not_depend_on_chunk_size(form, monkeypatch):
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "0")  # the fused kernel has no chunks
    torch.manual_seed(0)
    layer = GroupSelfAttention(dim=6, out_dim=8, num_heads=2, head_dim=5, group=get_group("R4"), kernel_size=5,
                               form=form).eval()
    x = torch.randn(2, 9, 9, 4, 6)
    with torch.no_grad():
        layer.chunk_elements = 1
        a = layer(x)
        layer.chunk_elements = 1 << 30
        b = layer(x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# Whole networks on the fused CPU kernel; on the chunked kernel the small ones only (its layers,
# R4M included, are checked against plain autograd and by gradcheck in the tests around this one):
# the RotMNIST R4 and R4M nets took 40-85 s each on it in a loaded CI run
_NETS = [(name, "fused") for name in ("gsa_rotmnist_r4", "gsa_rotmnist_r4m", "gsa_rotmnist_z2", "gsa_tiny_r4")]
_NETS += [(name, "chunked") for name in ("gsa_rotmnist_z2", "gsa_tiny_r4")]


@pytest.mark.parametrize("name, kernel", _NETS)
@pytest.mark.parametrize("form", ["paper", "aligned"])
def test_every_parameter_gets_a_finite_gradient(name, kernel, form, monkeypatch):
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "0" if kernel == "chunked" else "1")
    torch.manual_seed(0)
    model = create_model(name, form=form, attn_drop=0.1, value_drop=0.1).train()
    cfg = model.config
    x = torch.rand(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    out = model.forward_all(x)
    assert all(torch.isfinite(t).all() for t in out.values())
    loss = torch.nn.functional.cross_entropy(out["logits"], torch.tensor([1, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        if pname.endswith(("row.net.3.bias", "col.net.3.bias")):
            # The last bias of a coordinate MLP adds q . b to every key of a query alike: the
            # softmax cancels it, so its gradient is zero up to rounding (the paper has it too).
            assert p.grad.abs().max() < 1e-3
        else:
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def _layer(kind, form="paper", attn_drop=0.0):
    if kind == "lifting":
        return LiftingSelfAttention(dim=3, out_dim=6, num_heads=2, head_dim=4, group=get_group("R4"), kernel_size=3,
                                    crop=1, attn_drop=attn_drop)
    group = get_group("R4M" if kind == "group-r4m" else "R4")
    return GroupSelfAttention(dim=3, out_dim=6, num_heads=2, head_dim=6, group=group, kernel_size=5, crop=1, form=form,
                              attn_drop=attn_drop)


def _layer_reference(layer, x):
    """The layer's maths in plain autograd: ``project``, then unchunked attention, then ``proj``."""
    lifting = isinstance(layer, LiftingSelfAttention)
    xin = x.unsqueeze(3) if lifting else x
    b, h, w, g = xin.shape[:4]
    q, k, v = layer.project(xin)
    index, bias, _, rows = layer.geometry(h, w, x.device)
    plan = _plan("paper" if lifting else layer.form, index, bias, rows, 7)
    out = _traceable_attention(q, k, v, layer.encoding_table(), plan)
    hc = h - 2 * layer.crop
    out = out.permute(0, 2, 3, 1, 4).reshape(b, hc * hc, out.shape[3], -1)
    return layer.proj(out).view(b, hc, hc, out.shape[2], layer.out_dim)


@pytest.mark.parametrize("kind,form", [("lifting", "paper"), ("group", "paper"), ("group", "aligned"),
                                       ("group-r4m", "paper")])
def test_layer_gradients_with_recomputed_projections_match_autograd(kind, form, attention_kernel):
    """Training saves the layer input, not q, k, v, and recomputes the projections backward: the
    gradients of the input and of every parameter (projections, encoding MLP, output map) must be
    those of plain autograd over the same maths."""
    layer = _layer(kind, form).double().train()
    g = 1 if kind == "lifting" else layer.group.order
    shape = (2, 7, 7, 3) if kind == "lifting" else (2, 7, 7, g, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref = _layer_reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    wrt = (x, *layer.parameters())
    ours = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
    theirs = torch.autograd.grad(ref, wrt, grad_out, allow_unused=True)
    names = ["input"] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


def test_training_forward_saves_the_input_not_the_projections():
    """A layer keeps its input (C channels) for the backward pass, not q, k, v (nh d channels each,
    k and v zero-padded): none of them, nor a tensor of their size, is saved."""
    layer = _layer("group").train()
    x = torch.randn(2, 9, 9, 4, 3, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    q, k, v = layer.project(x)
    assert any(t is x for t in saved)
    assert k.numel() > 5 * x.numel()  # padded keys (and values) are the large tensors here
    assert not [tuple(t.shape) for t in saved if t.numel() >= k.numel() or t.shape == q.shape]


def test_bf16_autocast_recomputes_the_projections_in_bf16():
    """Under autocast the recomputed projections must be the forward pass's (bf16), so gradients
    equal those of the path that keeps q, k, v."""
    layer = _layer("group").train()
    x = torch.randn(2, 7, 7, 4, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    ours = torch.autograd.grad(out.float().square().sum(), (x, layer.query.weight, layer.key.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = layer.project(x)
        index, bias, _, rows = layer.geometry(7, 7, x.device)
        table = layer.encoding_table()  # the encoding MLP under autocast, as in the layer
        with torch.autocast("cpu", enabled=False):
            att = WindowAttention.apply(q.float(), k.float(), v.float(), table.float(),
                                        _plan("paper", index, bias, rows, 1000))
        ref = layer.proj(att.permute(0, 2, 3, 1, 4).reshape(2, 25, 4, -1)).view(2, 5, 5, 4, 6)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    theirs = torch.autograd.grad(ref.float().square().sum(), (x, layer.query.weight, layer.key.weight))
    for name, a, b in zip(["input", "query.weight", "key.weight"], ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"gradient of {name}")


# ---- bad input -------------------------------------------------------------------------------
def test_wrong_channel_count_is_named():
    model = create_model("gsa_tiny_r4")
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        model(torch.rand(1, 3, 16, 16))
    layer = GroupSelfAttention(dim=6, out_dim=8, num_heads=2, head_dim=5, group=get_group("R4"), kernel_size=3)
    with pytest.raises(ValueError, match="expects 6 input channels, got 5"):
        layer(torch.rand(1, 9, 9, 4, 5))
    with pytest.raises(ValueError, match=r"group axis of 4 \(R4\), got 8"):
        layer(torch.rand(1, 9, 9, 8, 6))


def test_non_square_input_is_rejected():
    with pytest.raises(ValueError, match="square"):
        create_model("gsa_tiny_r4")(torch.rand(1, 1, 16, 18))
    with pytest.raises(ValueError, match="square input"):
        LiftingSelfAttention(dim=1, out_dim=8, num_heads=2, head_dim=4, group=get_group("R4"),
                             kernel_size=3)(torch.rand(1, 9, 11, 1))


@pytest.mark.parametrize("kernel", [4, 0, -3])
def test_even_or_empty_window_is_rejected(kernel):
    with pytest.raises(ValueError, match="positive odd integer"):
        GroupSelfAttention(dim=6, out_dim=8, num_heads=2, head_dim=5, group=get_group("R4"), kernel_size=kernel)


def test_unknown_group_and_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown group 'P4'"):
        create_model("gsa_rotmnist_r4", group="P4")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("gsa_rotmnist_r5")
    with pytest.raises(ValueError, match="one entry per layer"):
        GSANetConfig(crops=(1, 1))
    with pytest.raises(ValueError, match="too small"):
        create_model("gsa_rotmnist_r4", img_size=12)
    with pytest.raises(ValueError, match="form must be one of"):
        create_model("gsa_rotmnist_r4", form="fast")


@pytest.mark.parametrize("cls", [LiftingSelfAttention, GroupSelfAttention])
def test_layer_arguments_are_keyword_only_and_checked(cls):
    """One keyword-only signature (WindowedAttention's): positional or unknown arguments raise,
    rather than landing in the wrong parameter or being swallowed."""
    args = dict(dim=3, out_dim=6, num_heads=2, head_dim=4, group=get_group("R4"), kernel_size=3)
    assert cls(**args).dim == 3
    with pytest.raises(TypeError):
        cls(3, 6, 2, 4, get_group("R4"), 3)
    with pytest.raises(TypeError, match="in_dim"):
        cls(in_dim=3, **{k: v for k, v in args.items() if k != "dim"})
    with pytest.raises(TypeError, match="drop_path"):
        cls(**args, drop_path=0.1)


def test_attention_plan_is_frozen_and_checked():
    index = torch.zeros(4, 9, dtype=torch.long)
    plan = AttentionPlan(form="aligned", index=index, bias=None, row_outside=[False] * 4, chunk=2)
    assert plan.row_outside == (False,) * 4 and plan.p_drop == 0.0 and plan.chunk_bias(0, 4) is None
    with pytest.raises(AttributeError):
        plan.chunk = 3
    with pytest.raises(ValueError, match="form must be one of"):
        AttentionPlan(form="fast", index=index, bias=None, row_outside=(False,) * 4, chunk=2)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        AttentionPlan(form="paper", index=index, bias=None, row_outside=(False,) * 4, chunk=0)
    with pytest.raises(ValueError, match="3 entries for 4 query positions"):
        AttentionPlan(form="paper", index=index, bias=None, row_outside=(False,) * 3, chunk=2)
    bias = torch.zeros(4, 9)
    plan = AttentionPlan(form="paper", index=index, bias=bias, row_outside=(False, True, False, False), chunk=2)
    assert plan.chunk_bias(2, 4) is None
    assert torch.equal(plan.chunk_bias(0, 2), bias[:2])
