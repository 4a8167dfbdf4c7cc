"""Triton forward kernels of the chunked SSD scan (Mamba-2), and their launchers.

Owns the forward decomposition (chunk size Q, a power of two; c = ceil(seqlen / Q) chunks, the
last one padded with dt = 0):
  1. _dt_cumsum:   dt -> dtp = clamp(softplus(dt + dt_bias)) and cs = log2(e) cumsum_Q(dtp * A)
                   both (batch, nheads, nchunks, Q) float32. cs is in base-2 units: every decay
                   exp(sum of dtp * A) is then exp2 of a difference of cs, one ex2.approx.ftz
                   instruction on the GPU (tl.exp is a multiply, a range test and two fix-up
                   multiplies around the ex2, per element of every decay matrix). The formulas
                   below write exp2(cs_i - cs_j) for that decay; gradients "of cs" are taken
                   with respect to the natural-unit cumsum, as before.
  2. _cb:          CB[i, j] = C_i . B_j per chunk and group, (batch, nchunks, ngroups, Q, Q) float32,
                   and 0 where j > i or i and j lie in different documents: CB carries the causal
                   and document structure, so its consumers (chunk scan, dx) need no elementwise
                   masks; they clamp the decay's exponent at 126 instead (exp2(cs_i - cs_j) for
                   j > i may overflow, and 0 * inf is NaN; for j <= i the exponent is <= 0 with
                   A < 0, so the clamp changes nothing there). Blocks wholly above the
                   diagonal are written as zeros without computing them.
  3. chunk states: per chunk and head, sum_j w_j x_j B_j^T -> (batch, nchunks, nheads, headdim, dstate)
  4. state passing: S_c = scale_c S_{c-1} + states_c: the state entering each chunk (prev) and the
                   final state (3 and 4, fused or not: triton_states.py)
  5. _chunk_scan:  y_i = exp2(cs_i) [doc] C_i prev^T + sum_{j<=i} CB_ij exp2(cs_i - cs_j) [doc] dtp_j x_j
                   + D x_i, then * silu(z_i)
All offsets are 64-bit: program ids and positions are cast to int64 before any stride product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import (INTERPRET, autotune_per_chunk, cdiv, configs_of, head_chunk_grid, head_chunk_pids,
                                   next_pow2, next_power_of_2)


@triton.jit
def _dot_f32_operand(acc, f, lp, F_LEFT: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + (f @ lp) with F_LEFT, else acc + (lp @ f): f a float32 tile, lp one in the input dtype.
    SPLIT (bf16/fp16 inputs): f reaches the tensor cores as a hi + lo pair of lp's dtype, two dots,
    ~16 mantissa bits at tensor-core speed (one rounding of f to bf16 lost ddt's cancellation:
    triton_bwd's docstring); otherwise f is cast once (float32 inputs: IEEE dots, DOT_PREC).
    Each dot accumulates into acc in place (the tensor cores' own float32 accumulator): summing the
    two products first and then adding them cost two float32 adds per accumulator element and dot."""
    if SPLIT:
        hi = f.to(lp.dtype)
        lo = (f - hi.to(tl.float32)).to(lp.dtype)
        if F_LEFT:
            out = tl.dot(lo, lp, tl.dot(hi, lp, acc))
        else:
            out = tl.dot(lp, lo, tl.dot(lp, hi, acc))
    elif F_LEFT:
        out = tl.dot(f.to(lp.dtype), lp, acc, input_precision=DOT_PREC)
    else:
        out = tl.dot(lp, f.to(lp.dtype), acc, input_precision=DOT_PREC)
    return out


@triton.jit
def _softplus(x):
    # log1p(exp(x)) accurate for very negative x (Kahan's log1p), identity above 20 like torch
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _dt_cumsum_kernel(
    dt_ptr, bias_ptr, A_ptr, dtp_ptr, cs_ptr,
    seqlen, nheads, nchunks, chunk_size,
    s_dt_b, s_dt_l, s_dt_h, dt_lo, dt_hi,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    t = pid_c * chunk_size + offs_q
    hmask = offs_h < nheads
    mask = (t < seqlen)[:, None] & (offs_q < chunk_size)[:, None] & hmask[None, :]
    dt = tl.load(dt_ptr + pid_b * s_dt_b + t[:, None] * s_dt_l + offs_h[None, :] * s_dt_h, mask=mask, other=0.0)
    dt = dt.to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    dt = tl.where(mask, dt, 0.0)
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    cs = tl.cumsum(dt * A[None, :], axis=0)
    out = ((pid_b * nheads + offs_h[None, :]) * nchunks + pid_c) * chunk_size + offs_q[:, None]
    smask = (offs_q < chunk_size)[:, None] & hmask[None, :]
    tl.store(dtp_ptr + out, dt, mask=smask)
    tl.store(cs_ptr + out, cs, mask=smask)


@triton.jit
def causal_document_keep(offs_i, offs_j, t_i, t_j, seq_ptr, pid_b, seqlen, s_seq_b, s_seq_l, HAS_SEQ: tl.constexpr):
    """(len(offs_i), len(offs_j)) mask of the pairs (i, j) of one chunk with j <= i in one document
    (positions t_i, t_j; past seqlen they count as the last position): CB's zeros (_cb_kernel) and
    dCB's (triton_bwd._chunk_dcb_kernel)."""
    keep = offs_i[:, None] >= offs_j[None, :]
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * s_seq_b
        seq_i = tl.load(seq_base + tl.minimum(t_i, seqlen - 1) * s_seq_l)
        seq_j = tl.load(seq_base + tl.minimum(t_j, seqlen - 1) * s_seq_l)
        keep = keep & (seq_i[:, None] == seq_j[None, :])
    return keep


@triton.jit
def _cb_kernel(
    C_ptr, B_ptr, seq_ptr, cb_ptr,
    seqlen, nchunks, chunk_size, dstate, ngroups,
    s_c_b, s_c_l, s_c_g, s_c_n, s_b_b, s_b_l, s_b_g, s_b_n, s_seq_b, s_seq_l,
    HAS_SEQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_bc = tl.program_id(1).to(tl.int64)
    pid_g = tl.program_id(2).to(tl.int64)
    num_n = tl.cdiv(chunk_size, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_m = pid_c * chunk_size + offs_m
    t_n = pid_c * chunk_size + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # blocks wholly above the diagonal are written as zeros (consumers' tiles may be larger than
    # these blocks and read into them, multiplying rather than selecting): no products there
    upper = pid_n * BLOCK_N > pid_m * BLOCK_M + BLOCK_M - 1
    for k0 in range(0, tl.where(upper, 0, dstate), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c = tl.load(
            C_ptr + pid_b * s_c_b + pid_g * s_c_g + t_m[:, None] * s_c_l + offs_k[None, :] * s_c_n,
            mask=(t_m < seqlen)[:, None] & (offs_k < dstate)[None, :], other=0.0,
        )
        bT = tl.load(
            B_ptr + pid_b * s_b_b + pid_g * s_b_g + t_n[None, :] * s_b_l + offs_k[:, None] * s_b_n,
            mask=(t_n < seqlen)[None, :] & (offs_k < dstate)[:, None], other=0.0,
        )
        acc += tl.dot(c, bT, input_precision=DOT_PREC)
    keep = causal_document_keep(offs_m, offs_n, t_m, t_n, seq_ptr, pid_b, seqlen, s_seq_b, s_seq_l, HAS_SEQ)
    acc = tl.where(keep, acc, 0.0)
    base = (pid_bc * ngroups + pid_g) * chunk_size * chunk_size
    tl.store(cb_ptr + base + offs_m[:, None] * chunk_size + offs_n[None, :], acc,
             mask=(offs_m < chunk_size)[:, None] & (offs_n < chunk_size)[None, :])


@triton.jit
def _chunk_scan_fwd_kernel(
    cb_ptr, x_ptr, z_ptr, D_ptr, C_ptr, prev_ptr, dtp_ptr, cs_ptr, seq_ptr, ypre_ptr, out_ptr,
    seqlen, nheads, nchunks, chunk_size, hdim, dstate, heads_per_group, ngroups,
    s_x_b, s_x_l, s_x_h, s_x_p, s_z_b, s_z_l, s_z_h, s_z_p, s_o_b, s_o_l, s_o_h, s_o_p,
    s_c_b, s_c_l, s_c_g, s_c_n, s_seq_b, s_seq_l, s_D_h, s_D_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, STORE_YPRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    """Grid (row tiles x headdim tiles, nheads, batch * nchunks) with HEADS_FAST, else (row tiles x
    headdim tiles, batch * nchunks, nheads). out, ypre (batch, seqlen, nheads, headdim); cb (batch,
    nchunks, ngroups, Q, Q); prev (batch, nchunks, nheads, headdim, dstate)."""
    pid_mp = tl.program_id(0)
    pid_bc, pid_h = head_chunk_pids(HEADS_FAST)
    num_p = tl.cdiv(hdim, BLOCK_P)
    pid_m = pid_mp // num_p
    pid_p = pid_mp % num_p
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    pid_g = pid_h // heads_per_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    t0 = pid_c * chunk_size
    t_m = t0 + offs_m
    mvalid = t_m < seqlen
    pmask = offs_p < hdim
    cs_base = ((pid_b * nheads + pid_h) * nchunks + pid_c) * chunk_size
    cs_m = tl.load(cs_ptr + cs_base + offs_m)
    u = tl.math.exp2(cs_m)
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * s_seq_b
        seq_m = tl.load(seq_base + tl.minimum(t_m, seqlen - 1) * s_seq_l)
        seq_in = tl.load(seq_base + tl.maximum(t0 - 1, 0) * s_seq_l)
        u = tl.where(seq_m == seq_in, u, 0.0)
    # off-diagonal: the state entering the chunk, read by C_i
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    prev_base = ((pid_b * nchunks + pid_c) * nheads + pid_h) * hdim * dstate
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = tl.load(
            C_ptr + pid_b * s_c_b + pid_g * s_c_g + t_m[:, None] * s_c_l + offs_n[None, :] * s_c_n,
            mask=mvalid[:, None] & (offs_n < dstate)[None, :], other=0.0,
        )
        prevT = tl.load(prev_ptr + prev_base + offs_p[None, :] * dstate + offs_n[:, None],
                        mask=pmask[None, :] & (offs_n < dstate)[:, None], other=0.0)
        acc += tl.dot(c, prevT.to(c.dtype), input_precision=DOT_PREC)
    acc = acc * u[:, None]
    # the chunk's own terms: sum_{j <= i} CB_ij exp2(cs_i - cs_j) dtp_j x_j. CB is 0 above the
    # diagonal and across documents (compute_cb), so no tile needs a mask; the exponent is clamped
    # at 126 so that the decay above the diagonal (exponent >= 0) cannot overflow to inf (0 * inf).
    cb_base = (pid_bc * ngroups + pid_g) * chunk_size * chunk_size
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, chunk_size)
    for k0 in range(0, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        t_k = t0 + offs_k
        cb = tl.load(cb_ptr + cb_base + offs_m[:, None] * chunk_size + offs_k[None, :])
        cs_k = tl.load(cs_ptr + cs_base + offs_k)
        dtp_k = tl.load(dtp_ptr + cs_base + offs_k)
        m = cb * tl.math.exp2(tl.minimum(cs_m[:, None] - cs_k[None, :], 126.0)) * dtp_k[None, :]
        xk = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + t_k[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                     mask=(t_k < seqlen)[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot(m.to(xk.dtype), xk, input_precision=DOT_PREC)
    omask = mvalid[:, None] & pmask[None, :]
    if HAS_D:
        xm = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + t_m[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                     mask=omask, other=0.0).to(tl.float32)
        d = tl.load(D_ptr + pid_h * s_D_h + offs_p * s_D_p, mask=pmask, other=0.0).to(tl.float32)
        acc += xm * d[None, :]
    o_off = pid_b * s_o_b + pid_h * s_o_h + t_m[:, None] * s_o_l + offs_p[None, :] * s_o_p
    if STORE_YPRE:
        tl.store(ypre_ptr + o_off, acc.to(ypre_ptr.dtype.element_ty), mask=omask)
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * s_z_b + pid_h * s_z_h + t_m[:, None] * s_z_l + offs_p[None, :] * s_z_p,
                     mask=omask, other=0.0).to(tl.float32)
        acc = acc * zz * tl.sigmoid(zz)
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------
# launchers


# CUDA: a few configs each, cached on disk by Triton (outputs are fully rewritten by any config);
# the first is the fixed one (kernels.deterministic). dstate in tiles of 64 or 32 (BLOCK_N): the
# C . prev part is then a loop of 2-4 pipelined steps, where a single step of 128 (the tiles before)
# kept two 32 KB buffers for one iteration, and 64 KB of shared memory allowed 3 programs per SM
# (18.75% occupancy; the profile had 41% of the warps' stalls on global loads). The first config
# takes 48 KB, 4 programs per SM: 16-20% faster than the best of the tiles before at the three
# bench shapes and the presets' training shapes on an H100 (bench/NOTES_kernels.md Run 15).
# (Split-decay, heads-inner and 8-warp dstate-tiled schedules were tried and removed: 26-48% slower;
# 128-row and 32-column tiles were 1.3-1.9x slower than the first config in Run 15.)
_CHUNK_SCAN_SPACE = [
    (dict(BLOCK_M=64, BLOCK_K=32, BLOCK_P=64, BLOCK_N=64), 4, 3),
    (dict(BLOCK_M=64, BLOCK_K=32, BLOCK_P=64, BLOCK_N=128), 4, 2),
    (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_P=64, BLOCK_N=128), 4, 2),
    (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_P=64, BLOCK_N=64), 4, 2),
    (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_P=64, BLOCK_N=64), 4, 3),
    (dict(BLOCK_M=64, BLOCK_K=32, BLOCK_P=64, BLOCK_N=32), 4, 4),
    (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_P=64, BLOCK_N=32), 4, 2),
]
_chunk_scan_tuned = autotune_per_chunk(
    _chunk_scan_fwd_kernel, configs_of(_CHUNK_SCAN_SPACE), key=["chunk_size", "hdim", "dstate", "HAS_SEQ", "HAS_Z"],
    chunk_params=("BLOCK_M", "BLOCK_K"), state_params=("BLOCK_N",))


def _blocks(chunk_size, hdim, dstate):
    """Fixed tile table of the forward kernels (chunk scan, chunk states, state passing)."""
    if INTERPRET:
        # tiles of 16 positions and 16 state columns: several tiles per chunk when Q > 16 and per
        # state when dstate > 16, so the tile loops (and their masked last steps) run on CPU, as the
        # GPU configs' loops do (the chunk scan steps through dstate by 64 or 32 there)
        q = min(chunk_size, 16)
        return dict(M=q, K=q, P=next_pow2(hdim), N=min(next_pow2(dstate), 16), warps=4, stages=1)
    return dict(M=min(64, chunk_size), K=min(64, chunk_size), P=min(64, next_pow2(hdim)),
                N=min(128, next_pow2(dstate)), warps=4, stages=2)


def dt_cumsum(dt, dt_bias, A, chunk_size, dt_softplus, dt_limit):
    batch, seqlen, nheads = dt.shape
    nchunks = cdiv(seqlen, chunk_size)
    dtp = torch.empty(batch, nheads, nchunks, chunk_size, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dtp)
    has_limit = tuple(dt_limit) != (0.0, float("inf"))
    BLOCK_H = min(8, next_power_of_2(nheads)) if not INTERPRET else next_power_of_2(nheads)
    grid = (batch, nchunks, cdiv(nheads, BLOCK_H))
    _dt_cumsum_kernel[grid](
        dt, dt_bias if dt_bias is not None else dt, A, dtp, cs, seqlen, nheads, nchunks, chunk_size,
        dt.stride(0), dt.stride(1), dt.stride(2), float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
        BLOCK_H=BLOCK_H, BLOCK_Q=next_power_of_2(chunk_size),
    )
    return dtp, cs


def seq_args(seq_idx, fallback):
    """seq_idx, or a stand-in tensor without it, and its strides ((0, 0) without it)."""
    return (seq_idx if seq_idx is not None else fallback), (seq_idx.stride() if seq_idx is not None else (0, 0))


def compute_cb(C, B, seq_idx, chunk_size, dot_prec):
    """-> CB (batch, nchunks, ngroups, Q, Q) float32 with the causal and document zeros (seq_idx or
    None: no documents); see _cb in the module docstring."""
    batch, seqlen, ngroups, dstate = B.shape
    nchunks = cdiv(seqlen, chunk_size)
    cb = torch.empty(batch, nchunks, ngroups, chunk_size, chunk_size, device=B.device, dtype=torch.float32)
    bs = _blocks(chunk_size, 1, dstate)
    BM = bs["M"]
    BK = min(64, next_pow2(dstate)) if not INTERPRET else next_pow2(dstate)
    grid = (cdiv(chunk_size, BM) ** 2, batch * nchunks, ngroups)
    seq, seq_s = seq_args(seq_idx, C)
    _cb_kernel[grid](
        C, B, seq, cb, seqlen, nchunks, chunk_size, dstate, ngroups, *C.stride(), *B.stride(), *seq_s,
        HAS_SEQ=seq_idx is not None, BLOCK_M=BM, BLOCK_N=BM, BLOCK_K=BK, DOT_PREC=dot_prec, num_warps=bs["warps"],
    )
    return cb


def chunk_scan(cb, x, z, D, C, prev, dtp, cs, seq_idx, chunk_size, store_ypre, dot_prec, config=None,
               heads_fast=True):
    """-> out (and ypre, the output before the gate, when store_ypre), shaped like x. config None: the
    autotuned schedule on CUDA (the interpreter: its own tiles); an index into _CHUNK_SCAN_SPACE:
    that config (benchmarks; ignored by the interpreter). heads_fast: the launch order
    (kernels._triton_utils.head_chunk_grid; the other order for benchmarks)."""
    batch, seqlen, nheads, hdim = x.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    nchunks = cdiv(seqlen, chunk_size)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(out) if store_ypre else out
    bs = _blocks(chunk_size, hdim, dstate)
    if D is not None:
        Ds = (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    else:
        Ds = (0, 0)
    zz = z if z is not None else x
    seq, seq_s = seq_args(seq_idx, cs)
    args = (cb, x, zz, D if D is not None else x, C, prev, dtp, cs, seq,
            ypre, out, seqlen, nheads, nchunks, chunk_size, hdim, dstate, nheads // ngroups, ngroups,
            *x.stride(), *zz.stride(), *out.stride(), *C.stride(),
            *seq_s, *Ds)
    kw = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, STORE_YPRE=store_ypre,
              DOT_PREC=dot_prec, HEADS_FAST=heads_fast)

    def grid(meta):
        tiles = cdiv(chunk_size, meta["BLOCK_M"]) * cdiv(hdim, meta["BLOCK_P"])
        return head_chunk_grid(tiles, nheads, batch * nchunks, heads_fast)

    if INTERPRET:
        _chunk_scan_fwd_kernel[grid](*args, **kw, BLOCK_M=bs["M"], BLOCK_P=bs["P"], BLOCK_K=bs["K"], BLOCK_N=bs["N"],
                                     num_warps=4)
    else:
        nb = next_pow2(dstate)
        launcher = (_chunk_scan_tuned(chunk_size, nb) if config is None else
                    _chunk_scan_tuned.with_config(config, chunk_size, nb))
        launcher[grid](*args, **kw)
    return out, ypre
