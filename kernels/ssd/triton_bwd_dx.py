"""Triton kernel of the SSD backward's step 3 (triton_bwd.py's decomposition): dx, ddtp, the column
part of dcs and dD's partial sums, per chunk, head and block of positions j (all of headdim):
    acc_j = exp2(cs_last - cs_j)[doc] dS_c B_j + sum_{i>=j} CB_ij exp2(cs_i - cs_j)[doc] dy_i
    dx_j = dtp_j acc_j + D dy_j,   ddtp_j = x_j . acc_j,   dcs_j = dy_j . y_ssd_j - dtp_j ddtp_j
Shapes: x, dy, dx (batch, seqlen, nheads, headdim); B (batch, seqlen, ngroups, dstate); cb
(batch, nchunks, ngroups, chunk, chunk) float32; dS (batch, nchunks, nheads, headdim, dstate)
float32; dtp, cs, ddtp, dcs (batch, nheads, nchunks, chunk) float32.
Precision: for bf16/fp16 inputs the two float32 operands of the products (the decayed CB matrix and
dS) go to the tensor cores as a hi + lo pair of the input dtype (two dots); rounding them to bf16
once made ddt/ddt_bias lose the cancellation between the row and column parts of dcs (GPU run 1:
ddt 1.5e-2 relative vs the fp32 reference; hi+lo: ~4e-4 in fp16). Every output element is written
by one program (dD: per-block partial sums, added by torch in a fixed order): deterministic.
All offsets are 64-bit (program ids cast to int64 before stride products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET, autotune_per_chunk, cdiv, configs_of, head_chunk_grid, head_chunk_pids
from kernels.ssd.triton_bwd import _blocks
from kernels.ssd.triton_fwd import _dot_f32_operand, seq_args


@triton.jit
def _chunk_dx_kernel(
    x_ptr, dy_ptr, D_ptr, B_ptr, cb_ptr, dS_ptr, dtp_ptr, cs_ptr, seq_ptr,
    dx_ptr, ddtp_ptr, dcs_ptr, dD_ptr,
    seqlen, nheads, nchunks, chunk_size, hdim, dstate, heads_per_group, ngroups, nblk_max,
    s_dx_b, s_dx_l, s_dx_h, s_dx_p, s_x_b, s_x_l, s_x_h, s_x_p, s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    s_b_b, s_b_l, s_b_g, s_b_n, s_seq_b, s_seq_l, s_D_h, s_D_p,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    """Grid (column blocks of BLOCK_J positions, nheads, batch * nchunks) with HEADS_FAST, else
    (column blocks, batch * nchunks, nheads): dx and ddtp of each position j of the block, and the
    column part of dcs; dx (batch, seqlen, nheads, headdim)."""
    pid_j = tl.program_id(0).to(tl.int64)
    pid_bc, pid_h = head_chunk_pids(HEADS_FAST)
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    pid_g = pid_h // heads_per_group
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < hdim
    t0 = pid_c * chunk_size
    t_j = t0 + offs_j
    jvalid = t_j < seqlen
    cs_base = ((pid_b * nheads + pid_h) * nchunks + pid_c) * chunk_size
    cs_j = tl.load(cs_ptr + cs_base + offs_j)
    dtp_j = tl.load(dtp_ptr + cs_base + offs_j)
    cs_last = tl.load(cs_ptr + cs_base + chunk_size - 1)
    w = tl.math.exp2(cs_last - cs_j)
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * s_seq_b
        seq_j = tl.load(seq_base + tl.minimum(t_j, seqlen - 1) * s_seq_l)
        seq_end = tl.load(seq_base + tl.minimum(t0 + chunk_size - 1, seqlen - 1) * s_seq_l)
        w = tl.where(seq_j == seq_end, w, 0.0)
    # through the chunk state: exp2(cs_last - cs_j) dS_c B_j
    acc = tl.zeros((BLOCK_J, BLOCK_P), dtype=tl.float32)
    dS_base = ((pid_b * nchunks + pid_c) * nheads + pid_h) * hdim * dstate
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        bj = tl.load(B_ptr + pid_b * s_b_b + pid_g * s_b_g + t_j[:, None] * s_b_l + offs_n[None, :] * s_b_n,
                     mask=jvalid[:, None] & (offs_n < dstate)[None, :], other=0.0)
        dST = tl.load(dS_ptr + dS_base + offs_p[None, :] * dstate + offs_n[:, None],
                      mask=pmask[None, :] & (offs_n < dstate)[:, None], other=0.0)
        acc = _dot_f32_operand(acc, dST, bj, False, SPLIT, DOT_PREC)
    acc = acc * w[:, None]
    # within the chunk: sum_{i >= j} CB_ij exp2(cs_i - cs_j) dy_i. CB is 0 above the diagonal and
    # across documents (triton_fwd.compute_cb): no tile needs a mask; the exponent is clamped at 126
    # so that the decay above the diagonal (exponent >= 0) cannot overflow to inf (0 * inf)
    cb_base = (pid_bc * ngroups + pid_g) * chunk_size * chunk_size
    for i0 in range(pid_j * BLOCK_J, chunk_size, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        t_i = t0 + offs_i
        cbT = tl.load(cb_ptr + cb_base + offs_i[None, :] * chunk_size + offs_j[:, None])
        cs_i = tl.load(cs_ptr + cs_base + offs_i)
        mT = cbT * tl.math.exp2(tl.minimum(cs_i[None, :] - cs_j[:, None], 126.0))
        dyi = tl.load(dy_ptr + pid_b * s_dy_b + pid_h * s_dy_h + t_i[:, None] * s_dy_l + offs_p[None, :] * s_dy_p,
                      mask=(t_i < seqlen)[:, None] & pmask[None, :], other=0.0)
        acc = _dot_f32_operand(acc, mT, dyi, True, SPLIT, DOT_PREC)
    jp = jvalid[:, None] & pmask[None, :]
    xj = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + t_j[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                 mask=jp, other=0.0).to(tl.float32)
    dyj = tl.load(dy_ptr + pid_b * s_dy_b + pid_h * s_dy_h + t_j[:, None] * s_dy_l + offs_p[None, :] * s_dy_p,
                  mask=jp, other=0.0).to(tl.float32)
    ddtp = tl.sum(acc * xj, axis=1)
    dx = acc * dtp_j[:, None]
    if HAS_D:
        d = tl.load(D_ptr + pid_h * s_D_h + offs_p * s_D_p, mask=pmask, other=0.0).to(tl.float32)
        dx += dyj * d[None, :]
        tl.store(dD_ptr + ((pid_bc * nblk_max + pid_j) * nheads + pid_h) * BLOCK_P + offs_p, tl.sum(dyj * xj, axis=0))
    dcs = -dtp_j * ddtp  # column part; the row part dy_i . y_ssd_i comes from _chunk_dcb/_chunk_dbc
    tl.store(dx_ptr + pid_b * s_dx_b + pid_h * s_dx_h + t_j[:, None] * s_dx_l + offs_p[None, :] * s_dx_p,
             dx.to(dx_ptr.dtype.element_ty), mask=jp)
    tl.store(ddtp_ptr + cs_base + offs_j, ddtp)
    tl.store(dcs_ptr + cs_base + offs_j, dcs)


# Autotuned for CUDA; BLOCK_J (which dD partial-sum rows a program writes) stays fixed, so every
# config writes the same elements. The first is the fixed one (kernels.deterministic): the H200's
# choice at the bench shapes and the presets' training shapes, 1.16x faster at the bench shapes than
# the tile that came first before (which spills 116/220 bytes: bench/kernels_static.py;
# bench/NOTES_kernels.md Run 9).
_DX_SPACE = [
    (dict(BLOCK_I=32, BLOCK_N=32), 4, 3), (dict(BLOCK_I=64, BLOCK_N=64), 4, 2), (dict(BLOCK_I=64, BLOCK_N=64), 4, 3),
    (dict(BLOCK_I=32, BLOCK_N=64), 4, 2), (dict(BLOCK_I=64, BLOCK_N=128), 8, 2),
    (dict(BLOCK_I=64, BLOCK_N=64), 8, 3), (dict(BLOCK_I=128, BLOCK_N=64), 8, 2),
    (dict(BLOCK_I=128, BLOCK_N=128), 8, 2), (dict(BLOCK_I=64, BLOCK_N=128), 4, 3),
    (dict(BLOCK_I=64, BLOCK_N=32), 4, 4),
    (dict(BLOCK_I=32, BLOCK_N=64), 8, 2), (dict(BLOCK_I=32, BLOCK_N=128), 8, 2), (dict(BLOCK_I=32, BLOCK_N=32), 8, 3),
]
_chunk_dx_tuned = autotune_per_chunk(_chunk_dx_kernel, configs_of(_DX_SPACE),
                                     key=["chunk_size", "hdim", "dstate", "HAS_SEQ", "SPLIT"], chunk_params=("BLOCK_I",))


def chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq_idx, chunk_size, dot_prec, config=None, heads_fast=True, dx=None):
    """-> dx (like x), ddtp and dcs's column part (like dtp), dD (or None). config None: the
    autotuned schedule on CUDA (the interpreter: its own tiles); an index into _DX_SPACE: that config
    (benchmarks; ignored by the interpreter). heads_fast: the launch order
    (kernels._triton_utils.head_chunk_grid; the other order for benchmarks). `dx`, optional: the
    tensor to write dx into (x's shape and dtype, any strides)."""
    batch, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = cdiv(seqlen, chunk_size)
    bs = _blocks(chunk_size, hdim, dstate)
    nblk = cdiv(chunk_size, bs["J"])
    if dx is None:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ddtp = torch.empty_like(dtp)
    dcs = torch.empty_like(dtp)
    dD = torch.empty(batch * nchunks, nblk, nheads, bs["P"], device=x.device, dtype=torch.float32) if D is not None else None
    Ds = (D.stride(0), D.stride(1) if D.dim() == 2 else 0) if D is not None else (0, 0)
    seq, seq_s = seq_args(seq_idx, cs)
    args = (
        x, dy, D if D is not None else x, B, cb, dS, dtp, cs, seq, dx, ddtp, dcs, dD if dD is not None else dx,
        seqlen, nheads, nchunks, chunk_size, hdim, dstate, nheads // ngroups, ngroups, nblk,
        *dx.stride(), *x.stride(), *dy.stride(), *B.stride(), *seq_s, *Ds,
    )
    kw = dict(HAS_D=D is not None, HAS_SEQ=seq_idx is not None, BLOCK_J=bs["J"], BLOCK_P=bs["P"],
              DOT_PREC=dot_prec, SPLIT=x.dtype != torch.float32, HEADS_FAST=heads_fast)
    grid = head_chunk_grid(nblk, nheads, batch * nchunks, heads_fast)
    if INTERPRET:
        _chunk_dx_kernel[grid](*args, **kw, BLOCK_I=bs["I"], BLOCK_N=bs["N"], num_warps=4)
    else:
        launcher = _chunk_dx_tuned(chunk_size) if config is None else _chunk_dx_tuned.with_config(config, chunk_size)
        launcher[grid](*args, **kw)
    if dD is not None:  # one reduction: per (head, headdim) for a 2-D D, per head for a 1-D one
        dD = dD[..., :hdim].sum((0, 1) if D.dim() == 2 else (0, 1, 3))
    return dx, ddtp, dcs, dD
