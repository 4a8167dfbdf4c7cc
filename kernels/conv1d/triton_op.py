"""Triton causal depthwise conv1d (channel-last), forward and backward, with fused SiLU and seq_idx.

Owns `causal_conv1d` for the Triton path (a tensor-only autograd.Function) and its kernels.
Shapes as in kernels.conv1d.reference: x (batch, seqlen, dim), weight (dim, width) width 2..4,
bias (dim,), seq_idx (batch, seqlen). Grid: (position blocks, channel blocks, batch).
The backward recomputes the pre-activation (no extra activation memory) and writes per-program
partial sums of dweight/dbias reduced by torch in a fixed order: no atomics, deterministic.
All offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET


@triton.jit
def _pre_act(x_ptr, w_ptr, bias_ptr, seq_ptr, pid_b, t, offs_d, dmask, seqlen, dim,
             s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_seq_b, s_seq_l,
             WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """bias + sum_s w[:, W-1-s] x[t - s] (same document only) for a (BLOCK_L, BLOCK_D) tile."""
    tvalid = (t >= 0) & (t < seqlen)
    if HAS_BIAS:
        acc = tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :] + tl.zeros(
            (BLOCK_L, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * s_seq_b + tl.minimum(tl.maximum(t, 0), seqlen - 1) * s_seq_l)
    for s in tl.static_range(WIDTH):
        ts = t - s
        ok = tvalid & (ts >= 0)
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + pid_b * s_seq_b + tl.minimum(tl.maximum(ts, 0), seqlen - 1) * s_seq_l)
            ok = ok & (seq_s == seq_t)
        xs = tl.load(x_ptr + pid_b * s_x_b + ts[:, None] * s_x_l + offs_d[None, :] * s_x_d,
                     mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_d * s_w_d + (WIDTH - 1 - s) * s_w_k, mask=dmask, other=0.0).to(tl.float32)
        acc += xs * w[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr, seqlen, dim,
    s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_seq_b, s_seq_l, s_o_b, s_o_l, s_o_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < dim
    acc = _pre_act(x_ptr, w_ptr, bias_ptr, seq_ptr, pid_b, t, offs_d, dmask, seqlen, dim,
                   s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_seq_b, s_seq_l,
                   WIDTH, HAS_BIAS, HAS_SEQ, BLOCK_L, BLOCK_D)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * s_o_b + t[:, None] * s_o_l + offs_d[None, :] * s_o_d, acc.to(out_ptr.dtype.element_ty),
             mask=(t < seqlen)[:, None] & dmask[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, seqlen, dim, nblk_l,
    s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_seq_b, s_seq_l, s_g_b, s_g_l, s_g_d, s_dx_b, s_dx_l, s_dx_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < dim
    tvalid = t < seqlen
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * s_seq_b + tl.minimum(t, seqlen - 1) * s_seq_l)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    part = (pid_b * nblk_l + pid_l) * WIDTH
    for s in tl.static_range(WIDTH):
        # output position u = t + s reads x[t] through weight column W-1-s
        u = t + s
        ok = u < seqlen
        if HAS_SEQ:
            seq_u = tl.load(seq_ptr + pid_b * s_seq_b + tl.minimum(u, seqlen - 1) * s_seq_l)
            ok = ok & (seq_u == seq_t)
        g = tl.load(dout_ptr + pid_b * s_g_b + u[:, None] * s_g_l + offs_d[None, :] * s_g_d,
                    mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_act(x_ptr, w_ptr, bias_ptr, seq_ptr, pid_b, u, offs_d, dmask, seqlen, dim,
                           s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_seq_b, s_seq_l,
                           WIDTH, HAS_BIAS, HAS_SEQ, BLOCK_L, BLOCK_D)
            sg = tl.sigmoid(pre)
            g = g * sg * (1.0 + pre * (1.0 - sg))
        w = tl.load(w_ptr + offs_d * s_w_d + (WIDTH - 1 - s) * s_w_k, mask=dmask, other=0.0).to(tl.float32)
        dx += g * w[None, :]
        if s == 0:
            g0 = g
    # dweight[:, W-1-s] = sum_t dpre[t] x[t - s]   (same document); dbias = sum_t dpre[t]
    for s in tl.static_range(WIDTH):
        ts = t - s
        ok = tvalid & (ts >= 0)
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + pid_b * s_seq_b + tl.maximum(ts, 0) * s_seq_l)
            ok = ok & (seq_s == seq_t)
        xs = tl.load(x_ptr + pid_b * s_x_b + ts[:, None] * s_x_l + offs_d[None, :] * s_x_d,
                     mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        tl.store(dw_ptr + (part + (WIDTH - 1 - s)) * dim + offs_d, tl.sum(g0 * xs, axis=0), mask=dmask)
    if HAS_BIAS:
        tl.store(db_ptr + (pid_b * nblk_l + pid_l) * dim + offs_d, tl.sum(g0, axis=0), mask=dmask)
    tl.store(dx_ptr + pid_b * s_dx_b + t[:, None] * s_dx_l + offs_d[None, :] * s_dx_d, dx.to(dx_ptr.dtype.element_ty),
             mask=tvalid[:, None] & dmask[None, :])


def _blocks(seqlen, dim, backward=False):
    """(BLOCK_L, BLOCK_D). The backward keeps ~8 tiles live (recomputed pre-activations, gradients):
    smaller tiles there avoid register spills (GPU run 3: 64x128 tiles made the backward 17x slower
    than the forward)."""
    if INTERPRET:
        return triton.next_power_of_2(max(seqlen, 2)), triton.next_power_of_2(max(dim, 2))
    if backward:
        return 32, min(64, triton.next_power_of_2(dim))
    return 64, min(64, triton.next_power_of_2(dim))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu):
        batch, seqlen, dim = x.shape
        BL, BD = _blocks(seqlen, dim)
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        seq = seq_idx if seq_idx is not None else x
        grid = (triton.cdiv(seqlen, BL), triton.cdiv(dim, BD), batch)
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, seq, out, seqlen, dim,
            *x.stride(), *weight.stride(), *(seq_idx.stride() if seq_idx is not None else (0, 0)), *out.stride(),
            WIDTH=weight.shape[1], HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
            BLOCK_L=BL, BLOCK_D=BD, num_warps=4,
        )
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx = ctx.saved_tensors
        batch, seqlen, dim = x.shape
        width = weight.shape[1]
        BL, BD = _blocks(seqlen, dim, backward=True)
        nblk = triton.cdiv(seqlen, BL)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dw = torch.empty(batch * nblk, width, dim, device=x.device, dtype=torch.float32)
        db = torch.empty(batch * nblk, dim, device=x.device, dtype=torch.float32) if bias is not None else dw
        seq = seq_idx if seq_idx is not None else x
        _conv_bwd_kernel[(nblk, triton.cdiv(dim, BD), batch)](
            x, weight, bias if bias is not None else weight, seq, dout, dx, dw, db, seqlen, dim, nblk,
            *x.stride(), *weight.stride(), *(seq_idx.stride() if seq_idx is not None else (0, 0)),
            *dout.stride(), *dx.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=ctx.silu,
            BLOCK_L=BL, BLOCK_D=BD, num_warps=4,
        )
        dweight = dw.sum(0).t().to(weight.dtype)
        dbias = db.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dweight, dbias, None, None


def causal_conv1d(x, weight, bias=None, *, seq_idx=None, activation=None):
    """Triton causal conv1d; same contract as kernels.conv1d.reference.causal_conv1d."""
    from kernels.conv1d.reference import _check

    _check(x, weight, bias, activation)
    return _CausalConv1d.apply(x, weight, bias, seq_idx, activation is not None)
