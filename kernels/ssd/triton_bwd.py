"""Triton backward kernels of the chunked SSD scan within chunks that sum over a group's heads (dCB,
dB/dC), their launchers and the timed choice of their head split.

Describes the whole backward decomposition (notation of triton_fwd.py; dy is the gradient of the
pre-gate output y_pre = y_ssd + D x, already multiplied by silu(z)); steps 4-5 are here, step 3 in
triton_bwd_dx.py, step 2 and the dt tail in triton_bwd_scan.py:
  1. dprev_c = sum_i exp2(cs_i)[doc] dy_i C_i^T            (triton_states._chunk_outer, MODE 1)
  2. _state_pass_bwd (triton_bwd_scan): reverse loop over chunks: dS_c (gradient of the state after chunk c,
     = gradient of states_c), d initial_states, and <dS_c, S_c> which is the gradient of cs at
     the chunk's last position through scale_c and the chunk-state weights
  3. _chunk_dx (triton_bwd_dx): per chunk, head and block of positions j (all of headdim):
        acc_j = exp2(cs_last - cs_j)[doc] dS_c B_j + sum_{i>=j} CB_ij exp2(cs_i - cs_j)[doc] dy_i
        dx_j = dtp_j acc_j + D dy_j,   ddtp_j = x_j . acc_j,
        dcs_j = dy_j . y_ssd_j - dtp_j ddtp_j      (all gradients of cs folded into per-position
        dot products: no cross-program reduction), and per-block partial sums of dy * x for dD
  4. _chunk_dcb: dCB_ij = sum over the group's heads of (dy_i . x_j) exp2(cs_i - cs_j)[doc] dtp_j
  5. _chunk_dbc: per group and block of positions r, looping over the group's heads:
        dC_r = sum_h exp2(cs_r)[doc] dy_r prev^T + sum_{k<=r} dCB_rk B_k
        dB_r = sum_h w_r x_r dS_c + sum_{k>=r} dCB_kr C_k
  Then the dt tail (triton_bwd_scan.dt_bwd, one fused kernel): dA_t = reverse cumsum of dcs within
  each chunk, ddtp += dA_t A, dA = sum dA_t dtp, and the dt processing (bias, softplus, clamp).
dCB and dB/dC loop over a group's heads inside each program (the heads of a group split over a few
programs whose float32 partial sums are added afterwards: chunk_dcb_dbc times the splits of
split_candidates once per shape on CUDA and keeps the fastest); on CUDA the autotuner also tries a
variant whose head loop is the innermost loop (HEAD_PIPE: the pipeliner prefetches the next heads'
tiles). dCB also has a split-decay schedule (SPLIT_DECAY: tiles off the diagonal factor
exp2(cs_i - cs_j) through a position between them, one exp per row and column instead of per
element; tried in dx and the chunk scan too and removed there, slower: bench/NOTES_kernels.md Run 9).
No atomics anywhere: every output element is written by exactly one program, and partial sums are
reduced by torch in a fixed order, so the backward is deterministic run to run.
All offsets are 64-bit (program ids cast to int64 before stride products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET, autotune_per_chunk, cdiv, choose_structure, configs_of, next_pow2
from kernels.ssd.triton_fwd import causal_document_keep, seq_args


@triton.jit
def _dcb_block(dy_h, x_h, t_i, t_j, offs_p, seqlen, hdim, s_dy_l, s_dy_p, s_x_l, s_x_p, DOT_PREC: tl.constexpr):
    """One head's dy_i . x_j over the headdim block offs_p: (len(t_i), len(t_j)) float32. dy_h, x_h
    point at the head's (batch row, head) origin."""
    dyi = tl.load(dy_h + t_i[:, None] * s_dy_l + offs_p[None, :] * s_dy_p,
                  mask=(t_i < seqlen)[:, None] & (offs_p < hdim)[None, :], other=0.0)
    xjT = tl.load(x_h + t_j[None, :] * s_x_l + offs_p[:, None] * s_x_p,
                  mask=(t_j < seqlen)[None, :] & (offs_p < hdim)[:, None], other=0.0)
    return tl.dot(dyi, xjT.to(dyi.dtype), input_precision=DOT_PREC)


@triton.jit
def _dcb_decayed(g, keep, cs_i, cs_j, dtp_j):
    """One head's dCB tile: g_ij exp2(cs_i - cs_j) dtp_j where keep, 0 elsewhere (one exp2 per element;
    where it overflows to inf, outside keep, the select drops it)."""
    return tl.where(keep, g * tl.math.exp2(cs_i[:, None] - cs_j[None, :]) * dtp_j[None, :], 0.0)


@triton.jit
def _dbc_block(dy_h, x_h, prev_h, dS_h, t_r, rvalid, offs_p, offs_n, nmask, hdim, dstate, s_dy_l, s_dy_p, s_x_l,
               s_x_p, DOT_PREC: tl.constexpr):
    """One head's (dy_r prev^T, x_r dS^T) over the headdim block offs_p, both (len(t_r), len(offs_n))
    float32; prev_h and dS_h point at the head's (hdim, dstate) chunk state, rounded to dy's dtype."""
    rp = rvalid[:, None] & (offs_p < hdim)[None, :]
    pn = (offs_p < hdim)[:, None] & nmask[None, :]
    dyr = tl.load(dy_h + t_r[:, None] * s_dy_l + offs_p[None, :] * s_dy_p, mask=rp, other=0.0)
    xr = tl.load(x_h + t_r[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=rp, other=0.0)
    pv = tl.load(prev_h + offs_p[:, None] * dstate + offs_n[None, :], mask=pn, other=0.0)
    ds = tl.load(dS_h + offs_p[:, None] * dstate + offs_n[None, :], mask=pn, other=0.0)
    return (tl.dot(dyr, pv.to(dyr.dtype), input_precision=DOT_PREC),
            tl.dot(xr, ds.to(xr.dtype), input_precision=DOT_PREC))


@triton.jit
def _dcb_heads(x_ptr, dy_ptr, dtp_ptr, cs_ptr, cb, keep, rows, offs_i, offs_j, t_i, t_j, pid_b, h0, cs_row,
               nhh, nchunks, chunk_size, num_j, seqlen, hdim, s_x_b, s_x_l, s_x_h, s_x_p,
               s_dy_b, s_dy_l, s_dy_h, s_dy_p, r_col, HAS_SEQ: tl.constexpr, BLOCK_I: tl.constexpr,
               BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_PIPE: tl.constexpr,
               HDIM_BLOCK: tl.constexpr, SPLIT: tl.constexpr, HEAD_STAGES: tl.constexpr):
    """The dCB tile (BLOCK_I, BLOCK_J) float32 summed over heads h0 .. h0 + nhh - 1 (consecutive, one
    group), each head's row sums of dCB_h * CB stored at `rows` (+ its cs offset times num_j).
    SPLIT (a tile wholly below the diagonal only): exp2(cs_i - cs_j) = exp2(cs_i - r) exp2(r - cs_j)
    with r = cs at column r_col of the chunk. HEAD_STAGES: see _chunk_dcb_kernel."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for hh in tl.range(0, nhh, num_stages=HEAD_STAGES):
        h = h0 + hh
        cs_base = (cs_row + hh * nchunks) * chunk_size
        dy_h = dy_ptr + pid_b * s_dy_b + h * s_dy_h
        x_h = x_ptr + pid_b * s_x_b + h * s_x_h
        if HEAD_PIPE:
            g = _dcb_block(dy_h, x_h, t_i, t_j, tl.arange(0, HDIM_BLOCK), seqlen, hdim, s_dy_l, s_dy_p, s_x_l, s_x_p,
                           DOT_PREC)
        else:
            g = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            for p0 in range(0, hdim, BLOCK_P):
                g += _dcb_block(dy_h, x_h, t_i, t_j, p0 + tl.arange(0, BLOCK_P), seqlen, hdim, s_dy_l, s_dy_p, s_x_l,
                                s_x_p, DOT_PREC)
        cs_i = tl.load(cs_ptr + cs_base + offs_i)
        cs_j = tl.load(cs_ptr + cs_base + offs_j)
        dtp_j = tl.load(dtp_ptr + cs_base + offs_j)
        if SPLIT:
            r = tl.load(cs_ptr + cs_base + r_col)
            dcb_h = g * tl.math.exp2(cs_i - r)[:, None] * (tl.math.exp2(r - cs_j) * dtp_j)[None, :]
            if HAS_SEQ:
                dcb_h = tl.where(keep, dcb_h, 0.0)
        else:
            dcb_h = _dcb_decayed(g, keep, cs_i, cs_j, dtp_j)
        acc += dcb_h
        # gradient of cs_i through the intra-chunk terms of row i: sum_j dCB_h,ij CB_ij = dy_i . y_diag_i
        tl.store(rows + cs_base * num_j, tl.sum(dcb_h * cb, axis=1))
    return acc


@triton.jit
def _chunk_dcb_kernel(
    x_ptr, dy_ptr, dtp_ptr, cs_ptr, seq_ptr, cb_ptr, dcb_ptr, rows_ptr,
    seqlen, nheads, nchunks, chunk_size, hdim, heads_per_group, ngroups, nsplit,
    s_x_b, s_x_l, s_x_h, s_x_p, s_dy_b, s_dy_l, s_dy_h, s_dy_p, s_seq_b, s_seq_l,
    HAS_SEQ: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PREC: tl.constexpr, HEAD_PIPE: tl.constexpr, HDIM_BLOCK: tl.constexpr, SPLIT_DECAY: tl.constexpr,
    HEAD_STAGES: tl.constexpr = None,
):
    """SPLIT_DECAY: a tile wholly below the diagonal factors each head's decay, exp2(cs_i - cs_j) =
    exp2(cs_i - r) exp2(r - cs_j) with r = cs at the tile's last column (between cs_j and cs_i, cs being
    monotone within a chunk): BLOCK_I + BLOCK_J exps per head, not BLOCK_I x BLOCK_J.
    HEAD_PIPE: one dot per head over all of headdim (HDIM_BLOCK = next power of two >= hdim), so
    the loop over heads is the innermost loop and the software pipeliner issues the next heads' dy
    and x loads while this head's tile is computed (num_stages); otherwise an inner loop over
    headdim blocks of BLOCK_P, whose loads the pipeliner overlaps only within one head. Both give
    the same bits when BLOCK_P >= hdim.
    HEAD_STAGES (None: the launch's num_stages, which pipelines only the loads that feed a dot):
    the heads loop pipelined in that many stages for every load in it, also each head's cs and dtp
    vectors, which otherwise wait a global-memory latency before each head's decay (Triton's
    pipeliner gives a latency only to loads that reach a dot operand; bench/NOTES_kernels.md)."""
    pid_ij = tl.program_id(0)
    pid_bc = tl.program_id(1).to(tl.int64)
    pid_gs = tl.program_id(2).to(tl.int64)
    pid_g = pid_gs // nsplit
    pid_s = pid_gs % nsplit
    heads_per_split = heads_per_group // nsplit
    num_j = tl.cdiv(chunk_size, BLOCK_J)
    pid_i = pid_ij // num_j
    pid_j = pid_ij % num_j
    if pid_j * BLOCK_J > pid_i * BLOCK_I + BLOCK_I - 1:
        return
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    t0 = pid_c * chunk_size
    t_i = t0 + offs_i
    t_j = t0 + offs_j
    keep = causal_document_keep(offs_i, offs_j, t_i, t_j, seq_ptr, pid_b, seqlen, s_seq_b, s_seq_l, HAS_SEQ)
    base = (pid_bc * ngroups + pid_g) * chunk_size * chunk_size
    cb = tl.load(cb_ptr + base + offs_i[:, None] * chunk_size + offs_j[None, :])  # zero outside keep already
    below = pid_j * BLOCK_J + BLOCK_J <= pid_i * BLOCK_I  # every column before every row: no causal mask
    h0 = pid_g * heads_per_group + pid_s * heads_per_split
    cs_row = (pid_b * nheads + h0) * nchunks + pid_c  # head h0's chunk in cs, dtp (batch, nheads, nchunks, Q)
    rows = rows_ptr + pid_j * chunk_size + offs_i
    # the runtime condition `below` chooses between two whole loops, not inside one: an if in the
    # heads loop breaks Triton 3.6's software pipeliner there (num_stages 3; "PassManager::run failed")
    if SPLIT_DECAY and below:
        acc = _dcb_heads(x_ptr, dy_ptr, dtp_ptr, cs_ptr, cb, keep, rows, offs_i, offs_j, t_i, t_j, pid_b, h0, cs_row,
                         heads_per_split, nchunks, chunk_size, num_j, seqlen, hdim, s_x_b, s_x_l, s_x_h, s_x_p,
                         s_dy_b, s_dy_l, s_dy_h, s_dy_p, pid_j * BLOCK_J + BLOCK_J - 1, HAS_SEQ, BLOCK_I, BLOCK_J,
                         BLOCK_P, DOT_PREC, HEAD_PIPE, HDIM_BLOCK, True, HEAD_STAGES)
    else:
        acc = _dcb_heads(x_ptr, dy_ptr, dtp_ptr, cs_ptr, cb, keep, rows, offs_i, offs_j, t_i, t_j, pid_b, h0, cs_row,
                         heads_per_split, nchunks, chunk_size, num_j, seqlen, hdim, s_x_b, s_x_l, s_x_h, s_x_p,
                         s_dy_b, s_dy_l, s_dy_h, s_dy_p, 0, HAS_SEQ, BLOCK_I, BLOCK_J,
                         BLOCK_P, DOT_PREC, HEAD_PIPE, HDIM_BLOCK, False, HEAD_STAGES)
    pbase = ((pid_bc * nsplit + pid_s) * ngroups + pid_g) * chunk_size * chunk_size  # (b, c, split, g, Q, Q)
    tl.store(dcb_ptr + pbase + offs_i[:, None] * chunk_size + offs_j[None, :], acc)


@triton.jit
def _chunk_dbc_kernel(
    x_ptr, dy_ptr, B_ptr, C_ptr, prev_ptr, dS_ptr, dcb_ptr, dtp_ptr, cs_ptr, seq_ptr, dB_ptr, dC_ptr, offd_ptr,
    seqlen, nheads, nchunks, chunk_size, hdim, dstate, heads_per_group, ngroups, nsplit,
    s_x_b, s_x_l, s_x_h, s_x_p, s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n, s_seq_b, s_seq_l, s_o_b, s_o_l, s_o_s, s_o_g,
    HAS_SEQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_PIPE: tl.constexpr, HDIM_BLOCK: tl.constexpr,
):
    """HEAD_PIPE: the loop over the group's heads is the innermost loop (one pair of dots per head
    over all of headdim, HDIM_BLOCK = next power of two >= hdim), so the pipeliner prefetches the
    next heads' dy, x, prev and dS tiles; otherwise an inner loop over headdim blocks of BLOCK_P.
    The same bits when BLOCK_P >= hdim. (Pipelining every load of the heads loop, as dCB's
    HEAD_STAGES does, lost here: its tiles then take 113 KB of shared memory, one program per SM;
    1.2-1.5x slower on an H100, bench/NOTES_kernels.md, nineteenth session.)"""
    pid_rn = tl.program_id(0)
    pid_bc = tl.program_id(1).to(tl.int64)
    pid_gs = tl.program_id(2).to(tl.int64)
    pid_g = pid_gs // nsplit
    pid_s = pid_gs % nsplit
    heads_per_split = heads_per_group // nsplit
    num_n = tl.cdiv(dstate, BLOCK_N)
    pid_r = pid_rn // num_n
    pid_n = pid_rn % num_n
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < dstate
    t0 = pid_c * chunk_size
    t_r = t0 + offs_r
    rvalid = t_r < seqlen
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * s_seq_b
        seq_r = tl.load(seq_base + tl.minimum(t_r, seqlen - 1) * s_seq_l)
        seq_in = tl.load(seq_base + tl.maximum(t0 - 1, 0) * s_seq_l)
        seq_end = tl.load(seq_base + tl.minimum(t0 + chunk_size - 1, seqlen - 1) * s_seq_l)
    dC = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    dB = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    c_r = tl.load(C_ptr + pid_b * s_c_b + pid_g * s_c_g + t_r[:, None] * s_c_l + offs_n[None, :] * s_c_n,
                  mask=rvalid[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    for hh in range(heads_per_split):
        h = pid_g * heads_per_group + pid_s * heads_per_split + hh
        cs_base = ((pid_b * nheads + h) * nchunks + pid_c) * chunk_size
        cs_r = tl.load(cs_ptr + cs_base + offs_r)
        cs_last = tl.load(cs_ptr + cs_base + chunk_size - 1)
        dtp_r = tl.load(dtp_ptr + cs_base + offs_r)
        u = tl.math.exp2(cs_r)
        w = tl.math.exp2(cs_last - cs_r) * dtp_r
        if HAS_SEQ:
            u = tl.where(seq_r == seq_in, u, 0.0)
            w = tl.where(seq_r == seq_end, w, 0.0)
        st_base = ((pid_b * nchunks + pid_c) * nheads + h) * hdim * dstate
        dy_h = dy_ptr + pid_b * s_dy_b + h * s_dy_h
        x_h = x_ptr + pid_b * s_x_b + h * s_x_h
        if HEAD_PIPE:
            accC, accB = _dbc_block(dy_h, x_h, prev_ptr + st_base, dS_ptr + st_base, t_r, rvalid,
                                    tl.arange(0, HDIM_BLOCK), offs_n, nmask, hdim, dstate, s_dy_l, s_dy_p, s_x_l, s_x_p,
                                    DOT_PREC)
        else:
            accC = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            accB = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for p0 in range(0, hdim, BLOCK_P):
                c_part, b_part = _dbc_block(dy_h, x_h, prev_ptr + st_base, dS_ptr + st_base, t_r, rvalid,
                                            p0 + tl.arange(0, BLOCK_P), offs_n, nmask, hdim, dstate, s_dy_l, s_dy_p,
                                            s_x_l, s_x_p, DOT_PREC)
                accC += c_part
                accB += b_part
        dC += accC * u[:, None]
        dB += accB * w[:, None]
        # gradient of cs_r through the off-diagonal term: dy_r . y_off_r (partial over this n block)
        tl.store(offd_ptr + (cs_base * num_n + pid_n * chunk_size) + offs_r, tl.sum(accC * c_r, axis=1) * u)
    if pid_s == 0:
        # dC_r += sum_{k <= r} dCB_rk B_k ;  dB_r += sum_{k >= r} dCB_kr C_k   (dCB summed over splits)
        hi = tl.minimum(pid_r * BLOCK_R + BLOCK_R, chunk_size)
        for k0 in range(0, hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            t_k = t0 + offs_k
            keep = offs_r[:, None] >= offs_k[None, :]
            d = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for sp in range(nsplit):
                pbase = ((pid_bc * nsplit + sp) * ngroups + pid_g) * chunk_size * chunk_size
                d += tl.load(dcb_ptr + pbase + offs_r[:, None] * chunk_size + offs_k[None, :])
            d = tl.where(keep, d, 0.0)
            bk = tl.load(B_ptr + pid_b * s_b_b + pid_g * s_b_g + t_k[:, None] * s_b_l + offs_n[None, :] * s_b_n,
                         mask=(t_k < seqlen)[:, None] & nmask[None, :], other=0.0)
            dC += tl.dot(d.to(bk.dtype), bk, input_precision=DOT_PREC)
        for k0 in range(pid_r * BLOCK_R, chunk_size, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            t_k = t0 + offs_k
            keep = offs_k[None, :] >= offs_r[:, None]
            dT = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for sp in range(nsplit):
                pbase = ((pid_bc * nsplit + sp) * ngroups + pid_g) * chunk_size * chunk_size
                dT += tl.load(dcb_ptr + pbase + offs_k[None, :] * chunk_size + offs_r[:, None])
            dT = tl.where(keep, dT, 0.0)
            ck = tl.load(C_ptr + pid_b * s_c_b + pid_g * s_c_g + t_k[:, None] * s_c_l + offs_n[None, :] * s_c_n,
                         mask=(t_k < seqlen)[:, None] & nmask[None, :], other=0.0)
            dB += tl.dot(dT.to(ck.dtype), ck, input_precision=DOT_PREC)
    # partial sums over this split's heads: (batch, seqlen, nsplit, ngroups, dstate), float32, or
    # with one split the gradients themselves in B's and C's dtypes; dB and dC share the strides
    # s_o_* (dstate's is 1)
    rn = rvalid[:, None] & nmask[None, :]
    o = pid_b * s_o_b + t_r[:, None] * s_o_l + pid_s * s_o_s + pid_g * s_o_g + offs_n[None, :]
    tl.store(dB_ptr + o, dB.to(dB_ptr.dtype.element_ty), mask=rn)
    tl.store(dC_ptr + o, dC.to(dC_ptr.dtype.element_ty), mask=rn)


# ----------------------------------------------------------------------------------------------
# launchers


# Autotuned variants for CUDA (a few configs each; results cached on disk by Triton). Tile sizes
# that decide which partial-sum rows a program writes (the dCB/dBC tiles; BLOCK_J of dx,
# triton_bwd_dx.py) stay fixed, so every config writes the same elements and autotuning reruns are harmless.
# dCB and dB/dC: the first configs (HEAD_PIPE False) are the schedules before the head-pipelined
# loop; the autotuner chooses between both (the first stays the fixed one)
_DCB_SPACE = [
    (dict(BLOCK_P=64, HEAD_PIPE=False), 4, 2), (dict(BLOCK_P=64, HEAD_PIPE=False), 4, 3),
    (dict(BLOCK_P=64, HEAD_PIPE=False), 8, 2), (dict(BLOCK_P=32, HEAD_PIPE=False), 4, 3),
    (dict(BLOCK_P=64, HEAD_PIPE=True), 4, 2), (dict(BLOCK_P=64, HEAD_PIPE=True), 4, 3),
    (dict(BLOCK_P=64, HEAD_PIPE=True), 8, 3), (dict(BLOCK_P=64, HEAD_PIPE=True), 4, 4),
    (dict(BLOCK_P=64, HEAD_PIPE=True, SPLIT_DECAY=True), 4, 3), (dict(BLOCK_P=64, HEAD_PIPE=True, SPLIT_DECAY=True), 8, 3),
    (dict(BLOCK_P=64, HEAD_PIPE=False, SPLIT_DECAY=True), 4, 2),
    # every load of the heads loop pipelined, the per-head cs / dtp vectors too (HEAD_STAGES): the
    # fastest at every bench and preset shape on an H100 (bench/NOTES_kernels.md, nineteenth session),
    # 8 warps capped at 128 registers (2 programs per SM; 144 uncapped, 1) and 4 warps
    (dict(BLOCK_P=64, HEAD_PIPE=True, SPLIT_DECAY=True, HEAD_STAGES=3), 8, 3, 128),
    (dict(BLOCK_P=64, HEAD_PIPE=True, SPLIT_DECAY=True, HEAD_STAGES=3), 4, 3),
]
_DCB_SPACE = [(dict({"SPLIT_DECAY": False}, **c[0]), *c[1:]) for c in _DCB_SPACE]
_DBC_SPACE = [
    (dict(BLOCK_R=64, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=False), 4, 2),
    (dict(BLOCK_R=64, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=False), 4, 3),
    (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=False), 4, 2),
    (dict(BLOCK_R=128, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=False), 8, 2),
    (dict(BLOCK_R=128, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=False), 8, 3),
    (dict(BLOCK_R=64, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=True), 4, 2),
    (dict(BLOCK_R=64, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=True), 4, 3),
    (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=True), 4, 3),
    (dict(BLOCK_R=128, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=True), 8, 2),
    # every config above spills registers at the presets' shapes (bench/kernels_static.py, Triton
    # 3.6: 196-2324 bytes); these 8-warp ones do not
    (dict(BLOCK_R=64, BLOCK_K=64, BLOCK_P=64, HEAD_PIPE=False), 8, 2),
    (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=False), 8, 2),
    (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=False), 8, 3),
    (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=True), 8, 2),
    (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_P=64, HEAD_PIPE=True), 8, 3),
]
_chunk_dcb_tuned = autotune_per_chunk(_chunk_dcb_kernel, configs_of(_DCB_SPACE), key=["chunk_size", "hdim", "HAS_SEQ"],
                                      chunk_params=())
_chunk_dbc_tuned = autotune_per_chunk(_chunk_dbc_kernel, configs_of(_DBC_SPACE),
                                      key=["chunk_size", "hdim", "dstate", "HAS_SEQ"],
                                      chunk_params=("BLOCK_R", "BLOCK_K"))


def _first_with(space, head_pipe, split_decay=False) -> int:
    """The index of the first config of `space` with the given HEAD_PIPE (and SPLIT_DECAY, where the
    space has it)."""
    return next(i for i, c in enumerate(space) if c[0]["HEAD_PIPE"] == head_pipe
                and c[0].get("SPLIT_DECAY", False) == split_decay)


def _blocks(chunk_size, hdim, dstate):
    """Fixed tiles of the backward kernels within chunks (dx's J, I, N, P: triton_bwd_dx.py; dCB's I, P;
    dB/dC's R, K, N, P). Interpreter: 16-position tiles, so the tile loops run on CPU."""
    if INTERPRET:
        q = min(chunk_size, 16)  # several tiles per chunk when Q > 16 (tile loops exercised on CPU)
        return dict(J=q, I=q, P=next_pow2(hdim), N=next_pow2(dstate), R=q, K=q, warps=4, stages=1)
    return dict(J=min(128, chunk_size), I=min(64, chunk_size), P=next_pow2(hdim), N=min(64, next_pow2(dstate)),
                R=min(64, chunk_size), K=min(64, chunk_size), warps=4, stages=2)


def _nsplit(heads_per_group):
    """Programs that share the heads of one group in dCB / dB, dC (partial sums, fixed order): the
    default split (kernels.deterministic, KERNELS_AUTOTUNE=0, the interpreter), and the largest split
    chunk_dcb_dbc times on CUDA."""
    if INTERPRET:
        return 2 if heads_per_group % 2 == 0 else 1  # exercise the split path at tiny sizes
    n = 1
    for d in range(1, heads_per_group + 1):
        if heads_per_group % d == 0 and heads_per_group // d >= 8:
            n = d
    return n


def dividing_splits(heads_per_group):
    """Every power-of-two split (1..64 programs) that divides a group's heads."""
    return tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if heads_per_group % k == 0)


def split_candidates(heads_per_group):
    """The head splits chunk_dcb_dbc times: the default and every dividing split below it (fewer
    programs, less float32 partial-sum traffic, never more memory)."""
    default = _nsplit(heads_per_group)
    return tuple(k for k in dividing_splits(heads_per_group) if k < default) + (default,)


def _shape_key(x, B, seq_idx, chunk_size):
    """The shape key under which choose_structure remembers head_split's choice for these inputs."""
    return (*x.shape, *B.shape[2:], chunk_size, x.dtype, seq_idx is not None)


def head_split(x, dy, B, C, prev, dS, dtp, cs, seq_idx, cb, chunk_size, dot_prec) -> int:
    """The split chunk_dcb_dbc uses for these arguments (its own): each of split_candidates timed on
    the first call per shape (CUDA; choose_structure: the split trades programs for partial-sum
    traffic, which depends on the GPU and the shape); _nsplit's where nothing is timed."""
    heads_per_group = x.shape[2] // B.shape[2]
    return choose_structure(
        "dcb_dbc_split", _shape_key(x, B, seq_idx, chunk_size), split_candidates(heads_per_group),
        lambda k: chunk_dcb_dbc(x, dy, B, C, prev, dS, dtp, cs, seq_idx, cb, chunk_size, dot_prec, nsplit=k),
        lambda: _nsplit(heads_per_group), x.device)


def chunk_dcb_dbc(x, dy, B, C, prev, dS, dtp, cs, seq_idx, cb, chunk_size, dot_prec, nsplit=None, out=None):
    """Steps 4 and 5: -> dB, dC (input dtype) and the per-head row and off-diagonal terms of dcs
    (chunk_dcb's rows, chunk_dbc's offd). nsplit None: head_split's choice. The bits depend on the
    split (the order of the head sums), so kernels.deterministic keeps the default. `out`: as in
    chunk_dbc."""
    if nsplit is None:
        nsplit = head_split(x, dy, B, C, prev, dS, dtp, cs, seq_idx, cb, chunk_size, dot_prec)
    dcb, rows = chunk_dcb(x, dy, dtp, cs, seq_idx, cb, B.shape[2], chunk_size, dot_prec, nsplit=nsplit)
    dB, dC, offd = chunk_dbc(x, dy, B, C, prev, dS, dcb, dtp, cs, seq_idx, chunk_size, dot_prec, out=out)
    return dB, dC, rows, offd


def chunk_dcb(x, dy, dtp, cs, seq_idx, cb, ngroups, chunk_size, dot_prec, head_pipe=None, split_decay=False,
              nsplit=None, config=None):
    """-> dCB partials (batch, nchunks, nsplit, ngroups, Q, Q) and per-head row terms of dcs
    (batch, nheads, nchunks, nj, Q). head_pipe None: the autotuned schedule on CUDA (the
    head-pipelined loop, unsplit decay, in the interpreter); True/False: that loop structure with the
    first such config of the given decay form (benchmarks and tests; the interpreter then splits
    headdim into blocks of 16). nsplit None: _nsplit's choice; otherwise that many programs share a
    group's heads here and in chunk_dbc (a divisor of the heads per group; benchmarks). config: an
    index into _DCB_SPACE, that config, whatever head_pipe says (benchmarks and tests; the
    interpreter runs its own tiles)."""
    batch, seqlen, nheads, hdim = x.shape
    nchunks = cdiv(seqlen, chunk_size)
    bs = _blocks(chunk_size, hdim, 16)
    BI = BJ = bs["I"]
    if nsplit is None:
        nsplit = _nsplit(nheads // ngroups)
    elif (nheads // ngroups) % nsplit:
        raise ValueError(f"nsplit {nsplit} does not divide the {nheads // ngroups} heads per group")
    dcb = torch.empty(batch, nchunks, nsplit, ngroups, chunk_size, chunk_size, device=x.device, dtype=torch.float32)
    nj = cdiv(chunk_size, BJ)
    rows = torch.zeros(batch, nheads, nchunks, nj, chunk_size, device=x.device, dtype=torch.float32)
    seq, seq_s = seq_args(seq_idx, cs)
    args = (x, dy, dtp, cs, seq, cb, dcb, rows, seqlen, nheads, nchunks, chunk_size, hdim, nheads // ngroups,
            ngroups, nsplit, *x.stride(), *dy.stride(), *seq_s)
    kw = dict(HAS_SEQ=seq_idx is not None, BLOCK_I=BI, BLOCK_J=BJ, DOT_PREC=dot_prec, HDIM_BLOCK=next_pow2(hdim))
    grid = (cdiv(chunk_size, BI) * nj, batch * nchunks, ngroups * nsplit)
    if INTERPRET:
        pipe = True if head_pipe is None else head_pipe
        _chunk_dcb_kernel[grid](*args, **kw, BLOCK_P=bs["P"] if pipe else 16, HEAD_PIPE=pipe,
                                SPLIT_DECAY=split_decay and head_pipe is not None, num_warps=4)
    else:
        if config is None and head_pipe is not None:
            config = _first_with(_DCB_SPACE, head_pipe, split_decay)
        launcher = _chunk_dcb_tuned(chunk_size) if config is None else _chunk_dcb_tuned.with_config(config, chunk_size)
        launcher[grid](*args, **kw)
    return dcb, rows


def chunk_dbc(x, dy, B, C, prev, dS, dcb, dtp, cs, seq_idx, chunk_size, dot_prec, head_pipe=None, out=None,
              config=None):
    """-> dB, dC (input dtype) and per-head off-diagonal terms of dcs (batch, nheads, nchunks, nn, Q).
    prev and dS may be float32 or the input dtype: the kernel rounds them to x's dtype for its dots.
    head_pipe: as in chunk_dcb. `out`, optional: (dB, dC) tensors to write the gradients into (B's
    shape and dtype, the same strides, unit dstate stride: column slices of a larger gradient).
    config: an index into _DBC_SPACE, that config (benchmarks and tests)."""
    batch, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = cdiv(seqlen, chunk_size)
    bs = _blocks(chunk_size, hdim, dstate)
    nsplit = dcb.shape[2]
    if out is not None and (out[0].stride() != out[1].stride() or out[0].stride(3) != 1):
        raise ValueError(f"chunk_dbc: the dB and dC outputs need equal strides with a unit dstate stride, got "
                         f"{out[0].stride()} and {out[1].stride()}")
    if nsplit == 1 and out is not None:
        dB, dC = out[0].unsqueeze(2), out[1].unsqueeze(2)
    else:
        # one split: the kernel writes dB and dC in their own dtypes (no float32 copy and cast pass)
        shape = (batch, seqlen, nsplit, ngroups, dstate)
        dB = torch.empty(shape, device=B.device, dtype=B.dtype if nsplit == 1 else torch.float32)
        dC = torch.empty(shape, device=C.device, dtype=C.dtype if nsplit == 1 else torch.float32)
    nn = cdiv(dstate, bs["N"])
    offd = torch.empty(batch, nheads, nchunks, nn, chunk_size, device=x.device, dtype=torch.float32)
    seq, seq_s = seq_args(seq_idx, cs)
    args = (x, dy, B, C, prev, dS, dcb, dtp, cs, seq, dB, dC, offd,
            seqlen, nheads, nchunks, chunk_size, hdim, dstate, nheads // ngroups, ngroups, nsplit,
            *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *seq_s, *dB.stride()[:4])
    kw = dict(HAS_SEQ=seq_idx is not None, BLOCK_N=bs["N"], DOT_PREC=dot_prec, HDIM_BLOCK=next_pow2(hdim))
    if INTERPRET:
        pipe = True if head_pipe is None else head_pipe
        grid = (cdiv(chunk_size, bs["R"]) * nn, batch * nchunks, ngroups * nsplit)
        _chunk_dbc_kernel[grid](*args, **kw, BLOCK_R=bs["R"], BLOCK_K=bs["K"], BLOCK_P=bs["P"] if pipe else 16,
                                HEAD_PIPE=pipe, num_warps=4)
    else:
        def grid(meta):
            return (cdiv(chunk_size, meta["BLOCK_R"]) * nn, batch * nchunks, ngroups * nsplit)

        if config is None and head_pipe is not None:
            config = _first_with(_DBC_SPACE, head_pipe)
        launcher = _chunk_dbc_tuned(chunk_size) if config is None else _chunk_dbc_tuned.with_config(config, chunk_size)
        launcher[grid](*args, **kw)
    if nsplit == 1:
        return dB[:, :, 0], dC[:, :, 0], offd
    if out is not None:
        return out[0].copy_(dB.sum(2)), out[1].copy_(dC.sum(2)), offd
    return dB.sum(2).to(B.dtype), dC.sum(2).to(C.dtype), offd
