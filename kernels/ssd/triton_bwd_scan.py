"""Triton kernels of the SSD backward's sequential and per-position parts, and their launchers:
the state passing in reverse over chunks (step 2 of triton_bwd.py's decomposition; steps 1 and 2
together: `dprev_and_pass_bwd`) and the fused dt tail (the gradients of cs summed to dA, ddt and
d dt_bias through the dt processing).
Shapes as in triton_bwd.py; all offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET, cdiv, next_power_of_2
from kernels.ssd import triton_states as states
from kernels.ssd.triton_fwd import _softplus, seq_args
from kernels.ssd.triton_states import _chunk_scale, _flat_block_start, _store_state


@triton.jit
def _state_pass_bwd_kernel(
    dprev_ptr, prev_ptr, final_ptr, dfinal_ptr, cs_ptr, seq_ptr, dS_ptr, dS_lp_ptr, dinit_ptr, dcs_last_ptr,
    seqlen, nheads, nchunks, chunk_size, dim, nblocks, s_seq_b, s_seq_l,
    HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, STORE_LP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_blk, pid_b, pid_h, offs, mask, bh, g = _flat_block_start(dfinal_ptr, nheads, dim, HAS_DFINAL, BLOCK)
    s_after = tl.load(final_ptr + bh + offs, mask=mask, other=0.0)
    for i in range(nchunks):
        c = nchunks - 1 - i
        off = ((pid_b * nchunks + c) * nheads + pid_h) * dim + offs
        _store_state(dS_ptr, dS_lp_ptr, off, g, mask, STORE_LP, True)
        tl.store(dcs_last_ptr + ((pid_b * nheads + pid_h) * nchunks + c) * nblocks + pid_blk, tl.sum(g * s_after))
        scale = _chunk_scale(cs_ptr, seq_ptr, pid_b, pid_h, c, nheads, nchunks, chunk_size, seqlen, s_seq_b, s_seq_l,
                             HAS_SEQ)
        s_after = tl.load(prev_ptr + off, mask=mask, other=0.0)
        g = tl.load(dprev_ptr + off, mask=mask, other=0.0) + scale * g
    tl.store(dinit_ptr + bh + offs, g, mask=mask)


@triton.jit
def _dt_bwd_kernel(
    dcs_ptr, rows_ptr, offd_ptr, last_ptr, ddtp_ptr, dtp_ptr, dt_ptr, bias_ptr, A_ptr, ddt_ptr, dA_ptr, dbias_ptr,
    seqlen, nheads, nchunks, chunk_size, n_rows, n_offd, n_last, dt_lo, dt_hi,
    s_dt_b, s_dt_l, s_dt_h, s_ddt_b, s_ddt_l, s_ddt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Per (batch, chunk, head block): dcs = column part + row parts (+ chunk-end part), the reverse
    cumsum to d(dA_t), ddtp += d(dA_t) A, partial dA, then the dt processing backward (softplus,
    clamp) to ddt and a partial d(dt_bias). Replaces ~15 small torch launches."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < nheads
    qh = (offs_q < chunk_size)[:, None] & hmask[None, :]
    bhc = (pid_b * nheads + offs_h[None, :]) * nchunks + pid_c  # (1, BLOCK_H)
    idx = bhc * chunk_size + offs_q[:, None]
    dcs = tl.load(dcs_ptr + idx, mask=qh, other=0.0)
    for j in range(n_rows):
        dcs += tl.load(rows_ptr + (bhc * n_rows + j) * chunk_size + offs_q[:, None], mask=qh, other=0.0)
    for j in range(n_offd):
        dcs += tl.load(offd_ptr + (bhc * n_offd + j) * chunk_size + offs_q[:, None], mask=qh, other=0.0)
    last = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(n_last):
        last += tl.load(last_ptr + (((pid_b * nheads + offs_h) * nchunks + pid_c) * n_last + j), mask=hmask, other=0.0)
    dcs += tl.where((offs_q == chunk_size - 1)[:, None], last[None, :], 0.0)
    da = tl.cumsum(dcs, axis=0, reverse=True)
    dtp = tl.load(dtp_ptr + idx, mask=qh, other=0.0)
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    g = tl.load(ddtp_ptr + idx, mask=qh, other=0.0) + da * A[None, :]
    tl.store(dA_ptr + (pid_b * nchunks + pid_c) * nheads + offs_h, tl.sum(da * dtp, axis=0), mask=hmask)
    t = pid_c * chunk_size + offs_q
    m = qh & (t < seqlen)[:, None]
    v = tl.load(dt_ptr + pid_b * s_dt_b + t[:, None] * s_dt_l + offs_h[None, :] * s_dt_h, mask=m, other=0.0)
    v = v.to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        sp = _softplus(v)
    else:
        sp = v
    if HAS_LIMIT:
        g = tl.where((sp >= dt_lo) & (sp <= dt_hi), g, 0.0)
    if SOFTPLUS:
        g = tl.where(v > 20.0, g, g * tl.sigmoid(v))
    g = tl.where(m, g, 0.0)
    tl.store(ddt_ptr + pid_b * s_ddt_b + t[:, None] * s_ddt_l + offs_h[None, :] * s_ddt_h,
             g.to(ddt_ptr.dtype.element_ty), mask=m)
    if HAS_BIAS:
        tl.store(dbias_ptr + (pid_b * nchunks + pid_c) * nheads + offs_h, tl.sum(g, axis=0), mask=hmask)


# ----------------------------------------------------------------------------------------------
# launchers


def dprev_and_pass_bwd(dy, C, cs, seq_idx, prev, final, dfinal, chunk_size, dot_prec):
    """Steps 1 and 2 (dprev by triton_states.chunk_outer in MODE 1, then state_pass_bwd) -> dS
    (float32), dS_lp (dy's dtype; dS itself for float32), d initial_states, per-chunk partials of
    <dS_c, S_c> (batch, nheads, nchunks, n partials)."""
    dprev = states.chunk_outer(dy, C, cs, cs, seq_idx, chunk_size, 1, dot_prec)
    return state_pass_bwd(dprev, prev, final, dfinal, cs, seq_idx, dy.shape[1], chunk_size, dy.dtype)


def state_pass_bwd(dprev, prev, final, dfinal, cs, seq_idx, seqlen, chunk_size, lp_dtype=torch.float32):
    """-> dS (gradient of each chunk's end state, float32, for dx), dS_lp (the same in lp_dtype,
    for the dB/dC kernel which rounds it so anyway), d initial_states, and per-chunk partials of
    <dS_c, S_c> (batch, nheads, nchunks, nblocks)."""
    batch, nchunks, nheads, hdim, dstate = dprev.shape
    dim = hdim * dstate
    BLOCK = next_power_of_2(dim) if INTERPRET else min(1024, next_power_of_2(dim))
    nblocks = cdiv(dim, BLOCK)
    dS = torch.empty_like(dprev)
    store_lp = lp_dtype != torch.float32
    dS_lp = torch.empty(dprev.shape, device=dprev.device, dtype=lp_dtype) if store_lp else dS
    dinit = torch.empty(batch, nheads, hdim, dstate, device=dprev.device, dtype=torch.float32)
    dcs_last = torch.empty(batch, nheads, nchunks, nblocks, device=dprev.device, dtype=torch.float32)
    seq, seq_s = seq_args(seq_idx, cs)
    _state_pass_bwd_kernel[(nblocks, batch, nheads)](
        dprev, prev, final, dfinal.contiguous() if dfinal is not None else final, cs, seq, dS, dS_lp, dinit,
        dcs_last, seqlen, nheads, nchunks, chunk_size, dim, nblocks, *seq_s,
        HAS_DFINAL=dfinal is not None, HAS_SEQ=seq_idx is not None, STORE_LP=store_lp, BLOCK=BLOCK, num_warps=4,
    )
    return dS, dS_lp, dinit, dcs_last


def dt_bwd(dcs, rows, offd, dcs_last, ddtp, dtp, dt, dt_bias, A, dt_softplus, dt_limit, ddt=None):
    """Fused tail: -> ddt (batch, seqlen, nheads) in dt's dtype, dA (nheads,), d dt_bias (nheads,) float32.
    `ddt`, optional: the tensor to write ddt into (dt's shape and dtype, any strides)."""
    batch, nheads, nchunks, chunk_size = dcs.shape
    seqlen = dt.shape[1]
    BLOCK_H = next_power_of_2(nheads) if INTERPRET else min(8, next_power_of_2(nheads))
    if ddt is None:
        ddt = torch.empty(dt.shape, device=dt.device, dtype=dt.dtype)
    dA = torch.empty(batch * nchunks, nheads, device=dt.device, dtype=torch.float32)
    dbias = torch.empty(batch * nchunks, nheads, device=dt.device, dtype=torch.float32) if dt_bias is not None else dA
    has_limit = tuple(dt_limit) != (0.0, float("inf"))
    _dt_bwd_kernel[(batch, nchunks, cdiv(nheads, BLOCK_H))](
        dcs, rows, offd, dcs_last, ddtp, dtp, dt, dt_bias if dt_bias is not None else dt, A, ddt, dA, dbias,
        seqlen, nheads, nchunks, chunk_size, rows.shape[3], offd.shape[3], dcs_last.shape[3],
        float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)), *dt.stride(), *ddt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
        BLOCK_H=BLOCK_H, BLOCK_Q=next_power_of_2(chunk_size), num_warps=4,
    )
    return ddt, dA.sum(0), (dbias.sum(0) if dt_bias is not None else None)
