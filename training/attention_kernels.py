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
"""

from __future__ import annotations

import torch

__all__ = ["attention_scores", "window_attention", "inference_attention"]


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


def _dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, device=device).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


def _chunks(x_total: int, n: int):
    for start in range(0, x_total, n):
        yield start, min(start + n, x_total)


def _chunk_forward(form, qc, kwin, vwin, table, bias, p_drop, seed):
    a = torch.softmax(attention_scores(form, qc, kwin, table, bias), dim=-1)
    if p_drop > 0:
        a = a * _dropout_mask(a.shape, p_drop, seed, a.device)
    if form == "paper":
        a = a.sum(dim=3)  # B, nh, n, G, J: sum over query orientations before the values
    return a @ vwin  # B, nh, n, G, d


def inference_attention(form, q, k, v, table, index, bias, row_outside, n, p_drop=0.0):
    """Forward only (no autograd): ``[B, nh, X, G, d]``."""
    outs = []
    for start, stop in _chunks(q.shape[2], n):
        idx = index[start:stop].reshape(-1)
        bias_c = bias[start:stop] if bias is not None and any(row_outside[start:stop]) else None
        seed = int(torch.randint(0, 2**62, ())) if p_drop > 0 else 0
        kwin, vwin = _gather(k, idx, stop - start), _gather(v, idx, stop - start)
        outs.append(_chunk_forward(form, q[:, :, start:stop], kwin, vwin, table, bias_c, p_drop, seed))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


class WindowAttention(torch.autograd.Function):
    """Autograd function over all chunks of one layer (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, table, form, index, bias, row_outside, n, p_drop):
        seeds = [int(torch.randint(0, 2**62, ())) if p_drop > 0 else 0 for _ in _chunks(q.shape[2], n)]
        outs = []
        for (start, stop), seed in zip(_chunks(q.shape[2], n), seeds):
            idx = index[start:stop].reshape(-1)
            bias_c = bias[start:stop] if bias is not None and any(row_outside[start:stop]) else None
            kwin, vwin = _gather(k, idx, stop - start), _gather(v, idx, stop - start)
            outs.append(_chunk_forward(form, q[:, :, start:stop], kwin, vwin, table, bias_c, p_drop, seed))
        ctx.save_for_backward(q, k, v, table)
        ctx.meta = (form, index, bias, row_outside, n, p_drop, seeds)
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, table = ctx.saved_tensors
        form, index, bias, row_outside, n, p_drop, seeds = ctx.meta
        dq, dk, dv, dtable = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(table)
        dout = dout.contiguous()
        for (start, stop), seed in zip(_chunks(q.shape[2], n), seeds):
            idx = index[start:stop].reshape(-1)
            bias_c = bias[start:stop] if bias is not None and any(row_outside[start:stop]) else None
            kwin, vwin = _gather(k, idx, stop - start), _gather(v, idx, stop - start)
            qc = q[:, :, start:stop]
            grads = _chunk_backward(form, qc, kwin, vwin, table, bias_c, p_drop, seed, dout[:, :, start:stop])
            dqc, dkwin, dvwin, dtab = grads
            dq[:, :, start:stop] = dqc
            b, nh, _, gk, d = k.shape
            dk.index_add_(2, idx, dkwin.reshape(b, nh, -1, gk, d))
            dv.index_add_(2, idx, dvwin.reshape(b, nh, -1, gk, d))
            dtable += dtab
        return dq, dk, dv, dtable, None, None, None, None, None, None


def _chunk_backward(form, qc, kwin, vwin, table, bias, p_drop, seed, doutc):
    """Gradients of one chunk: ``(dq [B,nh,n,Gq,d], dkwin [B,nh,n,J,d], dvwin, dtable)``."""
    b, nh, n, gq, d = qc.shape
    j = kwin.shape[3]
    a = torch.softmax(attention_scores(form, qc, kwin, table, bias), dim=-1)  # paper: B,nh,n,Gq,G,J
    mask = _dropout_mask(a.shape, p_drop, seed, a.device) if p_drop > 0 else None
    a_used = a * mask if mask is not None else a
    a_out = a_used.sum(dim=3) if form == "paper" else a_used  # B, nh, n, G, J
    dvwin = a_out.transpose(-1, -2) @ doutc  # B, nh, n, J, d
    da = doutc @ vwin.transpose(-1, -2)  # B, nh, n, G, J
    if form == "paper":
        da = da.unsqueeze(3)  # broadcast over query orientations: B, nh, n, 1, G, J
    ds = a * (da * mask if mask is not None else da)  # softmax backward: a (da - sum_j a da)
    ds.addcmul_(a, ds.sum(-1, keepdim=True), value=-1.0)
    del a, a_used
    if form == "paper":
        g = ds.shape[4]
        dc = ds.sum(dim=4)  # B, nh, n, Gq, J
        ds2 = ds.view(-1, g * j)  # B nh n Gq, G J
        dq = (ds2 @ table.t()).view(b, nh, n, gq, d) + dc @ kwin  # B, nh, n, Gq, d
        dtable = qc.reshape(-1, d).t() @ ds2  # d, G J
    else:
        dc = ds  # B, nh, n, G, J
        dsg = ds.permute(3, 0, 1, 2, 4).reshape(gq, -1, j)  # G, B nh n, J
        qg = qc.permute(3, 0, 1, 2, 4).reshape(gq, -1, d)  # G, B nh n, d
        dq_pos = torch.bmm(dsg, table.transpose(1, 2)).view(gq, b, nh, n, d).permute(1, 2, 3, 0, 4)
        dq = dq_pos + dc @ kwin  # B, nh, n, G, d
        dtable = torch.bmm(qg.transpose(1, 2), dsg)  # G, d, J
    dkwin = dc.transpose(-1, -2) @ qc  # B, nh, n, J, d
    return dq, dkwin, dvwin, dtable


def window_attention(form, q, k, v, table, index, bias, row_outside, n, p_drop=0.0):
    """Windowed attention of a whole layer, ``[B, nh, X, G, d]``; differentiable in q, k, v, table.

    Under autocast the kernel runs in float32 (scores, softmax, sums over orientations and the
    hand-written backward), with autocast off inside; the projections around it stay in the low
    precision. Mixed bf16/float32 operands used to raise inside it.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return window_attention(form, q.float(), k.float(), v.float(), table.float(), index, bias,
                                    row_outside, n, p_drop)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, table)):
        return WindowAttention.apply(q, k, v, table, form, index, bias, row_outside, n, p_drop)
    return inference_attention(form, q, k, v, table, index, bias, row_outside, n, p_drop)
