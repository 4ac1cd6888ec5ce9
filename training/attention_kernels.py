"""Chunked windowed attention with a hand-written, memory-bounded backward pass.

Axes: B batch, nh heads, X query positions, n queries in a chunk, Gq query orientations
(1 for the lifting layer), G output orientations, J = P G' keys per query, d head dim.

Two score forms, both ``softmax_j`` over a query's window:

- ``"paper"``: ``s[h~, h, j] = q(h~) . (k_j + T[h, j])``, then ``A'[h, j] = sum_h~ softmax(s)``
  (lifting is the special case Gq = 1);
- ``"aligned"``: ``s[h, j] = q(h) . (k_j + T[h, j])``, ``A' = softmax(s)``.

and ``out[h] = sum_j A'[h, j] v_j``.

Autograd through a loop of chunks would keep every chunk's probabilities alive (or, with
activation checkpointing, rebuild the full-size gradient of k and v for every chunk). Instead
:class:`WindowAttention` saves only its inputs; its backward recomputes each chunk's
probabilities and accumulates the gradients of k, v and the encoding table into one buffer each,
so memory stays at one chunk of scores whatever the image or batch size (as flash attention does
on GPUs). Attention dropout masks are regenerated in the backward pass from a per-chunk seed.

On the CPU, :func:`_run_chunks` and :func:`_attention_backward` hand the whole layer to the fused
kernel (:mod:`training.fused_attention`, the same maths one query position at a time, no chunks);
the chunk loop below is what GPUs, graph capture and ``GSA_FUSED_ATTENTION=0`` run.

The geometry and settings of a call (form, window index, border bias, chunk size, dropout) come in
one :class:`training.attention_plan.AttentionPlan`, built by the layer.

The layers go one step further (:class:`ProjectedWindowAttention`): they hand the kernel their
input and projection weights rather than ``q, k, v``, which are several times larger (``nh d``
channels against ``C``, keys and values zero-padded), and the backward pass recomputes the
projections. The RotMNIST R4 net at batch 8 then keeps 54 MB for its backward pass instead of 115
(`benchmarks/bench_layers.py --part memory --allocator fixed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training import fused_attention
from training.attention_plan import AttentionPlan

__all__ = [
    "attention_scores",
    "window_attention",
    "projected_window_attention",
    "inference_attention",
    "padded_keys",
]


def padded_keys(x: torch.Tensor, t: torch.Tensor, pad: int) -> torch.Tensor:
    """Keys or values of the layer input ``x``, zero-padded by ``pad`` on every side and laid out
    in memory for the kernel that will run on them (the fused kernel's own layout on the CPU).

    Args:
        x: the layer input (decides the kernel, as in :func:`_run_chunks`).
        t: ``[B, H, W, G, nh, d]``.
        pad: rows and columns of zeros added on every side.

    Returns:
        ``[B, nh, Hp Wp, G, d]``.
    """
    if fused_attention.usable(x):
        return fused_attention.padded_keys(t, pad)
    b, _, _, g, nh, d = t.shape
    if pad:
        t = F.pad(t, (0, 0, 0, 0, 0, 0, pad, pad, pad, pad))  # B, Hp, Wp, G, nh, d
    return t.reshape(b, -1, g, nh, d).permute(0, 3, 1, 2, 4).contiguous()  # B, nh, Hp Wp, G, d


def _content(qc: torch.Tensor, kwin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``q . k`` over the window, keys outside the image at -inf: ``[B, nh, n, Gq, J]``."""
    c = qc @ kwin.transpose(-1, -2)  # B, nh, n, Gq, J
    if bias is not None:
        b, nh, n, gq, j = c.shape
        p = bias.shape[-1]
        c = (c.view(b, nh, n, gq, p, j // p) + bias.view(n, 1, p, 1)).view(b, nh, n, gq, j)
    return c


def attention_scores(form: str, qc, kwin, table, bias) -> torch.Tensor:
    """Scores of a chunk: paper ``[B, nh, n, Gq, G, J]``, aligned ``[B, nh, n, G, J]``."""
    b, nh, n, gq, d = qc.shape
    j = kwin.shape[3]
    if form == "paper":
        s = (qc.reshape(-1, d) @ table).view(b, nh, n, gq, -1, j)  # B, nh, n, Gq, G, J
        s += _content(qc, kwin, bias).unsqueeze(4)  # + B, nh, n, Gq, 1, J
        return s
    qg = qc.permute(3, 0, 1, 2, 4).reshape(gq, -1, d)  # G, B nh n, d
    pos = torch.bmm(qg, table).view(gq, b, nh, n, j).permute(1, 2, 3, 0, 4)  # B, nh, n, G, J
    return _content(qc, kwin, bias) + pos  # B, nh, n, G, J


def _gather(k: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Window of every query in a chunk: ``[B, nh, N, G', d]`` -> ``[B, nh, n, P G', d]``."""
    b, nh, _, gk, d = k.shape
    return k.index_select(2, idx).view(b, nh, n, -1, d)  # B, nh, n, J, d


def _chunks(x_total: int, n: int):
    for start in range(0, x_total, n):
        yield start, min(start + n, x_total)


class _Workspace:
    """Flat buffers reused by every chunk of one layer call: the first (largest) chunk allocates
    them, later chunks take views of their front. Without it each chunk allocated a dozen
    score-sized temporaries, and glibc kept the freed ones mapped (the resident set grew to about
    twice the live memory) or, with a fixed mmap threshold, faulted fresh pages in for every chunk.
    """

    def __init__(self, like: torch.Tensor):
        self.dtype, self.device = like.dtype, like.device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype or self.dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


def _gather_into(ws: _Workspace, name: str, k: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`_gather` into a workspace buffer: ``[B, nh, n, J, d]``."""
    b, nh, _, gk, d = k.shape
    out = ws.get(name, (b, nh, idx.numel(), gk, d))
    torch.index_select(k, 2, idx, out=out)
    return out.view(b, nh, n, -1, d)


def _probabilities(ws: _Workspace, form, qc, kwin, table, bias) -> torch.Tensor:
    """Softmax of a chunk's scores in the workspace: paper ``[B, nh, n, Gq, G, J]``, aligned
    ``[B, nh, n, G, J]`` (the same maths as :func:`attention_scores`, without temporaries)."""
    b, nh, n, gq, d = qc.shape
    j = kwin.shape[3]
    content = ws.get("content", (b, nh, n, gq, j))
    torch.matmul(qc, kwin.transpose(-1, -2), out=content)
    if bias is not None:
        p = bias.shape[-1]
        content.view(b, nh, n, gq, p, j // p).add_(bias.view(n, 1, p, 1))
    if form == "paper":
        g = table.shape[1] // j
        s = ws.get("scores", (b, nh, n, gq, g, j))
        torch.mm(qc.reshape(-1, d), table, out=s.view(-1, g * j))
        s.add_(content.unsqueeze(4))
    else:
        pos = ws.get("pos", (gq, b * nh * n, j))
        torch.bmm(qc.permute(3, 0, 1, 2, 4).reshape(gq, -1, d), table, out=pos)
        s = ws.get("scores", (b, nh, n, gq, j))
        torch.add(content, pos.view(gq, b, nh, n, j).permute(1, 2, 3, 0, 4), out=s)
    return torch._softmax(s, -1, False, out=s)


def _mask_into(ws: _Workspace, shape, p: float, seed: int) -> torch.Tensor:
    """A chunk's dropout mask (kept with probability 1 - p, scaled by 1 / (1 - p)), regenerated
    from its seed in the backward pass.

    On the CPU, ``bernoulli_`` draws from MT19937 once per element, on one thread: with a mask the
    size of the scores it took 60% of a RotMNIST R4 training step at ``attn_drop`` 0.1. Here each
    64-bit draw gives four 16-bit lanes, one per element, kept when below ``round((1 - p) 2^16)``;
    the kept ones are scaled by the inverse of that quantised probability, so the mask stays
    unbiased (the keep probability is off by at most 2^-17 from 1 - p). GPUs keep ``bernoulli_``.
    """
    gen = torch.Generator(device=ws.device).manual_seed(seed)
    mask = ws.get("mask", shape)
    if ws.device.type != "cpu":
        return mask.bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)
    numel = mask.numel()
    words = ws.get("mask_bits", ((numel + 3) // 4,), torch.int64).random_(-(2**63), None, generator=gen)
    threshold = min(max(round((1.0 - p) * 65536), 1), 65536)  # of 2^16 lane values
    lanes = words.view(torch.int16)[:numel].view(mask.shape)  # uniform over [-2^15, 2^15)
    torch.lt(lanes, threshold - 32768, out=mask)
    return mask.mul_(65536 / threshold)


def _chunk_forward(ws, form, qc, kwin, vwin, table, bias, p_drop, seed, out):
    """One chunk's output written into ``out`` ``[B, nh, n, G, d]``."""
    a = _probabilities(ws, form, qc, kwin, table, bias)
    if p_drop > 0:
        a.mul_(_mask_into(ws, a.shape, p_drop, seed))
    if form == "paper":
        b, nh, n, _, g, j = a.shape
        a = torch.sum(a, dim=3, out=ws.get("summed", (b, nh, n, g, j)))  # over query orientations
    out.copy_(torch.matmul(a, vwin, out=ws.get("out", out.shape)))


def _run_chunks(q, k, v, table, plan: AttentionPlan, seeds: list[int]) -> torch.Tensor:
    """Forward over all chunks into one ``[B, nh, X, G, d]`` tensor, sharing one workspace; on the
    CPU the fused kernel (:mod:`training.fused_attention`, no chunks, ``seeds[0]`` for dropout)."""
    if fused_attention.usable(q):
        return fused_attention.forward(q, k, v, table, plan, seeds[0] if seeds else 0)
    form, index = plan.form, plan.index
    b, nh, x_total, _, _ = q.shape
    g = table.shape[1] // (index.shape[1] * k.shape[3]) if form == "paper" else table.shape[0]
    out = q.new_empty(b, nh, x_total, g, v.shape[-1])
    ws = _Workspace(q)
    for (start, stop), seed in zip(_chunks(x_total, plan.chunk), seeds):
        idx = index[start:stop].reshape(-1)
        bias_c = plan.chunk_bias(start, stop)
        kwin, vwin = _gather_into(ws, "kwin", k, idx, stop - start), _gather_into(ws, "vwin", v, idx, stop - start)
        _chunk_forward(ws, form, q[:, :, start:stop], kwin, vwin, table, bias_c, plan.p_drop, seed,
                       out[:, :, start:stop])
    return out


def _seeds(q: torch.Tensor, plan: AttentionPlan) -> list[int]:
    """One dropout seed per chunk, so the backward pass can regenerate each chunk's mask (one for
    the whole layer on the fused kernel, which has no chunks)."""
    count = 1 if fused_attention.usable(q) else len(range(0, q.shape[2], plan.chunk))
    return [int(torch.randint(0, 2**62, ())) if plan.p_drop > 0 else 0 for _ in range(count)]


def inference_attention(q, k, v, table, plan: AttentionPlan) -> torch.Tensor:
    """Forward only (no autograd): ``[B, nh, X, G, d]``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return _traceable_attention(q, k, v, table, plan)
    return _run_chunks(q, k, v, table, plan, _seeds(q, plan))


def _traceable_attention(q, k, v, table, plan: AttentionPlan) -> torch.Tensor:
    """The same forward in plain functional ops, for graph capture (ONNX export); no dropout."""
    form, index = plan.form, plan.index
    outs = []
    for start, stop in _chunks(q.shape[2], plan.chunk):
        idx = index[start:stop].reshape(-1)
        bias_c = plan.chunk_bias(start, stop)
        kwin, vwin = _gather(k, idx, stop - start), _gather(v, idx, stop - start)
        a = torch.softmax(attention_scores(form, q[:, :, start:stop], kwin, table, bias_c), dim=-1)
        outs.append((a.sum(dim=3) if form == "paper" else a) @ vwin)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


class WindowAttention(torch.autograd.Function):
    """Autograd function over all chunks of one layer (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, table, plan: AttentionPlan):
        seeds = _seeds(q, plan)
        out = _run_chunks(q, k, v, table, plan, seeds)
        ctx.save_for_backward(q, k, v, table)
        ctx.plan, ctx.seeds = plan, seeds
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, table = ctx.saved_tensors
        dq, dk, dv, dtable = _attention_backward(q, k, v, table, ctx.plan, ctx.seeds, dout)
        return dq, dk, dv, dtable, None


def _attention_backward(q, k, v, table, plan: AttentionPlan, seeds: list[int], dout):
    """Gradients ``(dq, dk, dv, dtable)`` of a whole layer's attention, chunk by chunk (on the CPU
    by the fused kernel, like :func:`_run_chunks`)."""
    if fused_attention.usable(q):
        return fused_attention.backward(q, k, v, table, plan, seeds[0] if seeds else 0, dout)
    form, index = plan.form, plan.index
    dq, dk, dv, dtable = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(table)
    dout = dout.contiguous()
    ws = _Workspace(q)
    b, nh, _, gk, d = k.shape
    for (start, stop), seed in zip(_chunks(q.shape[2], plan.chunk), seeds):
        idx = index[start:stop].reshape(-1)
        bias_c = plan.chunk_bias(start, stop)
        kwin, vwin = _gather_into(ws, "kwin", k, idx, stop - start), _gather_into(ws, "vwin", v, idx, stop - start)
        dqc, dkwin, dvwin = _chunk_backward(ws, form, q[:, :, start:stop], kwin, vwin, table, bias_c, plan.p_drop,
                                            seed, dout[:, :, start:stop], dtable)
        dq[:, :, start:stop] = dqc
        dk.index_add_(2, idx, dkwin.view(b, nh, -1, gk, d))
        dv.index_add_(2, idx, dvwin.view(b, nh, -1, gk, d))
    return dq, dk, dv, dtable


def _kernel_dtype(autocast: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast the kernel runs in float32 (see :func:`window_attention`); otherwise as given."""
    return tuple(t.float() for t in tensors) if autocast else tensors


class ProjectedWindowAttention(torch.autograd.Function):
    """The projections that make ``q, k, v`` from a layer's input ``x``, then :class:`WindowAttention`,
    as one autograd node that saves ``x`` and the projection weights instead of ``q, k, v``.

    ``q, k, v`` have ``nh d`` channels per position and group element against the input's ``C``
    (RotMNIST: 90 against 20), and ``k, v`` are zero-padded around the image: saving them held about
    half of what a training step keeps for its backward pass. The backward pass recomputes them
    (three small GEMMs, under the autocast state of the forward pass), runs the chunked attention
    backward and takes the projections' gradients with :func:`torch.autograd.grad`.
    ``project(x, *params) -> (q, k, v)`` must be a pure function of its arguments.
    """

    @staticmethod
    def forward(ctx, x, table, project, plan: AttentionPlan, *params):
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        q, k, v = _kernel_dtype(ctx.autocast[0], *project(x, *params))
        seeds = _seeds(q, plan)
        with torch.autocast(device_type, enabled=False):
            out = _run_chunks(q, k, v, _kernel_dtype(ctx.autocast[0], table)[0], plan, seeds)
        ctx.save_for_backward(x, table, *params)
        ctx.project = project
        ctx.plan, ctx.seeds = plan, seeds
        return out

    @staticmethod
    def backward(ctx, dout):
        x, table, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wants = (needs[0], *needs[4:])  # x, then params (after table, project, plan)
        leaves = [t.detach().requires_grad_(want) for t, want in zip((x, *params), wants)]
        device_type = x.device.type
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            q, k, v = ctx.project(*leaves)
        with torch.autocast(device_type, enabled=False):
            qf, kf, vf, tablef, doutf = _kernel_dtype(enabled, q.detach(), k.detach(), v.detach(), table, dout)
            dq, dk, dv, dtable = _attention_backward(qf, kf, vf, tablef, ctx.plan, ctx.seeds, doutf)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad((q, k, v), wanted, (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)),
                                         allow_unused=True) if wanted else ())
        dx, *dparams = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        dtable = dtable.to(table.dtype) if needs[1] else None
        return (dx, dtable, None, None, *dparams)


def _chunk_backward(ws, form, qc, kwin, vwin, table, bias, p_drop, seed, doutc, dtable):
    """Gradients of one chunk ``(dq [B,nh,n,Gq,d], dkwin [B,nh,n,J,d], dvwin)``, each a workspace
    view valid until the next chunk; the table's gradient is accumulated into ``dtable``."""
    b, nh, n, gq, d = qc.shape
    j = kwin.shape[3]
    a = _probabilities(ws, form, qc, kwin, table, bias)  # paper: B,nh,n,Gq,G,J; aligned: B,nh,n,G,J
    g = a.shape[-2]
    mask = _mask_into(ws, a.shape, p_drop, seed) if p_drop > 0 else None
    ds = ws.get("ds", a.shape)
    a_used = torch.mul(a, mask, out=ds) if mask is not None else a
    a_out = torch.sum(a_used, dim=3, out=ws.get("summed", (b, nh, n, g, j))) if form == "paper" else a_used
    dvwin = torch.matmul(a_out.transpose(-1, -2), doutc, out=ws.get("dvwin", (b, nh, n, j, d)))
    da = torch.matmul(doutc, vwin.transpose(-1, -2), out=ws.get("da", (b, nh, n, g, j)))
    if form == "paper":
        da = da.unsqueeze(3)  # broadcast over query orientations: B, nh, n, 1, G, J
    # softmax backward: ds = a * (da' - sum_j a da'), with da' = da * mask
    if mask is not None:
        torch.mul(mask, da, out=ds).mul_(a)
    else:
        torch.mul(a, da, out=ds)
    ds.addcmul_(a, ds.sum(-1, keepdim=True), value=-1.0)
    dq = ws.get("dq", (b, nh, n, gq, d))
    if form == "paper":
        dc = torch.sum(ds, dim=4, out=ws.get("dc", (b, nh, n, gq, j)))  # B, nh, n, Gq, J
        ds2 = ds.view(-1, g * j)  # B nh n Gq, G J
        torch.mm(ds2, table.t(), out=dq.view(-1, d))
        dtable.addmm_(qc.reshape(-1, d).t(), ds2)  # d, G J
    else:
        dc = ds  # B, nh, n, G, J
        dsg = ds.permute(3, 0, 1, 2, 4).reshape(gq, -1, j)  # G, B nh n, J
        qg = qc.permute(3, 0, 1, 2, 4).reshape(gq, -1, d)  # G, B nh n, d
        dq_pos = torch.bmm(dsg, table.transpose(1, 2), out=ws.get("dq_pos", (gq, b * nh * n, d)))
        dq.copy_(dq_pos.view(gq, b, nh, n, d).permute(1, 2, 3, 0, 4))
        dtable.baddbmm_(qg.transpose(1, 2), dsg)  # G, d, J
    dq.view(-1, gq, d).baddbmm_(dc.reshape(-1, gq, j), kwin.reshape(-1, j, d))  # + content term
    dkwin = torch.matmul(dc.transpose(-1, -2), qc, out=ws.get("dkwin", (b, nh, n, j, d)))
    return dq, dkwin, dvwin


def window_attention(q, k, v, table, plan: AttentionPlan) -> torch.Tensor:
    """Windowed attention of a whole layer, ``[B, nh, X, G, d]``; differentiable in q, k, v, table.

    Under autocast the kernel runs in float32 (scores, softmax, sums over orientations and the
    hand-written backward), with autocast off inside; the projections around it stay in the low
    precision. Mixed bf16/float32 operands used to raise inside it.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return window_attention(q.float(), k.float(), v.float(), table.float(), plan)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, table)):
        return WindowAttention.apply(q, k, v, table, plan)
    return inference_attention(q, k, v, table, plan)


def projected_window_attention(x, params, project, table, plan: AttentionPlan) -> torch.Tensor:
    """``window_attention(*project(x, *params), table, plan)``; when gradients are needed, as
    :class:`ProjectedWindowAttention` (saves ``x`` and ``params``, recomputes ``q, k, v`` backward)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, table, *params)):
        return ProjectedWindowAttention.apply(x, table, project, plan, *params)
    q, k, v = project(x, *params)
    return window_attention(q, k, v, table, plan)
