"""The fused CPU attention kernel (training/csrc/window_attention.cpp) against the chunked kernel:
outputs and gradients, strided inputs, its dropout masks, and clear errors."""

import os

import pytest
import torch

import training.fused_attention as fused
from training.attention_kernels import _attention_backward, _run_chunks
from training.attention_plan import AttentionPlan
from training.group_attention import GroupSelfAttention
from training.groups import get_group
from training.windows import neighbour_index, window_offsets

pytestmark = pytest.mark.skipif(os.environ.get("GSA_FUSED_ATTENTION") == "0", reason="fused kernel switched off")


def _inputs(form, gq, g, dtype, size=7, kernel=5, b=2, nh=3, d=6, p_drop=0.0):
    """``q, k, v, table`` and the plan (chunks of 5 query positions for the chunked kernel)."""
    torch.manual_seed(0)
    offsets = window_offsets(kernel)
    index, outside, pad = neighbour_index(size, size, offsets, 1)
    bias = torch.zeros(outside.shape).masked_fill(outside, float("-inf"))
    gk = gq
    q = torch.randn(b, nh, index.shape[0], gq, d, dtype=dtype)
    k = torch.randn(b, nh, (size + 2 * pad) ** 2, gk, d, dtype=dtype)
    v = torch.randn_like(k)
    j = offsets.shape[0] * gk
    table = torch.randn(*((d, g * j) if form == "paper" else (g, d, j)), dtype=dtype)
    plan = AttentionPlan(form=form, index=index, bias=bias, row_outside=tuple(outside.any(dim=1).tolist()), chunk=5,
                         p_drop=p_drop)
    return q, k, v, table, plan


def _chunked(monkeypatch, q, k, v, table, plan, dout):
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "0")
    out = _run_chunks(q, k, v, table, plan, [0] * 100)
    grads = _attention_backward(q, k, v, table, plan, [0] * 100, dout)
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "1")
    return out, grads


def test_the_kernel_builds_here():
    """CI builds it (the train extra brings ninja; a C++ compiler is on the machine): a silent
    fallback to the chunked kernel would halve the training speed unnoticed."""
    assert fused.load() is not None
    assert fused.usable(torch.empty(1))
    assert not fused.usable(torch.empty(1, dtype=torch.bfloat16))


CASES = [("paper", 4, 4), ("paper", 1, 8), ("aligned", 4, 4), ("paper", 8, 8), ("aligned", 3, 3)]


@pytest.mark.parametrize("form,gq,g", CASES, ids=["paper-R4", "lifting-R8", "aligned-R4", "paper-R4M", "aligned-3"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["float64", "float32"])
def test_matches_the_chunked_kernel(form, gq, g, dtype, tol, monkeypatch):
    q, k, v, table, plan = _inputs(form, gq, g, dtype)
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], g, q.shape[4], dtype=dtype)
    ref, ref_grads = _chunked(monkeypatch, q, k, v, table, plan, dout)
    out = fused.forward(q, k, v, table, plan, 0)
    grads = fused.backward(q, k, v, table, plan, 0, dout)
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)
    for name, a, b in zip(["q", "k", "v", "table"], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max(), msg=f"gradient of {name}")


def test_reads_and_writes_the_layers_permuted_layouts(monkeypatch):
    """The layers hand over q (and get dout) as permuted views of [B, X, G, nh, d] memory; the
    output comes back in that layout, so merging the heads needs no copy."""
    q, k, v, table, plan = _inputs("paper", 4, 4, torch.float64)
    q_strided = q.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    assert not q_strided.is_contiguous() and torch.equal(q_strided, q)
    dout = torch.randn(2, q.shape[2], 4, 3, 6, dtype=torch.float64).permute(0, 3, 1, 2, 4)  # B, nh, X, G, d view
    ref, ref_grads = _chunked(monkeypatch, q, k, v, table, plan, dout.contiguous())
    out = fused.forward(q_strided, k, v, table, plan, 0)
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = fused.backward(q_strided, k, v, table, plan, 0, dout)
    assert grads[0].stride() == q_strided.stride()
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_padded_keys_are_laid_out_as_the_kernel_reads_them(monkeypatch):
    """The layers' keys and values: the same values as the chunked kernel's layout, zero-padded,
    with the fused kernel's memory layout [B, nh, d, N, G'] (so that it need not copy them)."""
    from training.attention_kernels import padded_keys

    x = torch.randn(2, 5, 5, 4, 3)
    t = torch.randn(2, 5, 5, 4, 3, 6)  # B, H, W, G, nh, d
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "1")
    ours = padded_keys(x, t, 2)
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "0")
    ref = padded_keys(x, t, 2)
    assert ours.shape == ref.shape == (2, 3, 81, 4, 6) and ref.is_contiguous()
    assert ours.permute(0, 1, 4, 2, 3).is_contiguous()
    assert torch.equal(ours, ref)
    assert torch.equal(fused.padded_keys(t, 0), ref.view(2, 3, 9, 9, 4, 6)[:, :, 2:7, 2:7].reshape(2, 3, 25, 4, 6))


def test_layer_training_step_matches_the_chunked_kernel(monkeypatch):
    """A whole layer in float32 (projections, permuted views, recomputation backward)."""
    torch.manual_seed(1)
    layer = GroupSelfAttention(dim=6, out_dim=8, num_heads=3, head_dim=5, group=get_group("R4"), kernel_size=5,
                               crop=1).train()
    x = torch.randn(2, 9, 9, 4, 6, requires_grad=True)
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("GSA_FUSED_ATTENTION", mode)
        out = layer(x)
        results.append((out, torch.autograd.grad(out.square().sum(), (x, *layer.parameters()))))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = ["input"] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        # atol floor 1e-4: the encoding MLPs' last biases get zero gradients up to rounding (1e-6 here)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0), msg=name)


class _Fixed(torch.autograd.Function):
    """The fused kernel with one dropout seed, as the layers' autograd node uses it."""

    @staticmethod
    def forward(ctx, q, k, v, table, plan, seed):
        ctx.save_for_backward(q, k, v, table)
        ctx.plan, ctx.seed = plan, seed
        return fused.forward(q, k, v, table, plan, seed)

    @staticmethod
    def backward(ctx, dout):
        return (*fused.backward(*ctx.saved_tensors, ctx.plan, ctx.seed, dout), None, None)


@pytest.mark.parametrize("form,gq,g", [("paper", 2, 2), ("aligned", 2, 2), ("paper", 1, 4)])
def test_dropout_backward_regenerates_the_forward_masks(form, gq, g):
    """gradcheck with attention dropout 0.4: the backward pass must see exactly the forward's masks."""
    q, k, v, table, plan = _inputs(form, gq, g, torch.float64, size=5, kernel=3, b=1, nh=1, d=3, p_drop=0.4)
    args = [t.requires_grad_() for t in (q, k, v, table)]
    assert torch.autograd.gradcheck(lambda *t: _Fixed.apply(*t, plan, 1234), args, eps=1e-6, atol=1e-6)


def _masks(p, seed, queries=400, keys=64):
    """Read the masks out: one query orientation, keys with equal scores (zero q), value j the
    j-th unit vector, so out[x, d] = mask[x, d] / keys."""
    index = torch.arange(queries * keys).view(queries, keys) % (queries * keys)
    q = torch.zeros(1, 1, queries, 1, keys, dtype=torch.float64)
    k = torch.zeros(1, 1, queries * keys, 1, keys, dtype=torch.float64)
    v = torch.eye(keys, dtype=torch.float64).repeat(queries, 1).view(1, 1, queries * keys, 1, keys)
    table = torch.zeros(keys, keys, dtype=torch.float64)
    plan = AttentionPlan(form="paper", index=index, bias=None, row_outside=(False,) * queries, chunk=queries, p_drop=p)
    out = fused.forward(q, k, v, table, plan, seed)
    return (out * keys).view(queries, keys)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_unbiased_reproducible_and_uncorrelated(p):
    mask = _masks(p, seed=7)
    n = mask.numel()
    threshold = round((1 - p) * 65536)
    assert set(torch.round(mask.unique(), decimals=9).tolist()) == {0.0, round(65536 / threshold, 9)}
    kept = (mask > 0).double()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma
    assert abs(mask.mean().item() - 1.0) < 5 * sigma / (1 - p)
    # neighbouring keys and neighbouring queries are independent: P(kept, kept) = (1 - p)^2
    for a, b in [(kept[:, :-1], kept[:, 1:]), (kept[:-1], kept[1:])]:
        assert abs((a * b).mean().item() - (1 - p) ** 2) < 5 * 2 * sigma
    assert torch.equal(_masks(p, seed=7), mask)
    assert not torch.equal(_masks(p, seed=8), mask)


def test_bad_input_gets_a_clear_error():
    q, k, v, table, plan = _inputs("paper", 4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="share one dtype"):
        fused.forward(q, k.double(), v, table, plan, 0)
    with pytest.raises(RuntimeError, match=r"paper-form table must be \[d, G\*J\]"):
        fused.forward(q, k, v, table[:, :-1], plan, 0)
    short = AttentionPlan(form="paper", index=plan.index[:-1], bias=plan.bias[:-1], row_outside=plan.row_outside[:-1],
                          chunk=5)
    with pytest.raises(RuntimeError, match="one row per query position"):
        fused.forward(q, k, v, table, short, 0)


def test_mode_switch_is_validated(monkeypatch):
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "yes")
    with pytest.raises(ValueError, match="GSA_FUSED_ATTENTION must be one of"):
        fused.load()
    monkeypatch.setenv("GSA_FUSED_ATTENTION", "0")
    assert fused.load() is None and not fused.usable(torch.empty(1))
