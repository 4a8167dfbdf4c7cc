"""Triton kernels of the SSD's chunk states and state passing (steps 3 and 4 of triton_fwd.py's
decomposition; step 1 of the backward's, and its reverse walk's shared helpers), and their launchers:
  _chunk_outer:   per chunk and head, states = sum_j w_j x_j B_j^T, w_j = exp2(cs_last - cs_j) dtp_j
                  [same document as the chunk end] -> (batch, nchunks, nheads, headdim, dstate);
                  MODE 1 computes the backward's dprev with the same loop
  _state_pass:    S_c = scale_c S_{c-1} + states_c, scale_c = exp2(cs_last) [no document start in
                  chunk c] (_chunk_scale); writes the state entering each chunk (prev) and the final state
Two kernels, not one walk: a fused kernel that walked the chunks in order with the state in
registers (no chunk states in memory) lost to this pair at every shape timed on an H100 and an
H200 (1.1-2.1x slower: batch x heads x state tiles programs, each walking every chunk, hide too
little latency; bench/NOTES_kernels.md Run 16) and was removed.
All offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET, autotune_per_chunk, cdiv, configs_of, next_power_of_2
from kernels.ssd.triton_fwd import _blocks, _dot_f32_operand, seq_args


@triton.jit
def _chunk_scale(cs_ptr, seq_ptr, pid_b, pid_h, c, nheads, nchunks, chunk_size, seqlen, s_seq_b, s_seq_l,
                 HAS_SEQ: tl.constexpr):
    """How much of the state entering chunk c survives it: exp2(cs at the chunk's last position), or 0
    when a document starts inside the chunk (the seq_idx at its end differs from the one just before
    it). Shared by the forward and backward state passing, fused or not."""
    scale = tl.math.exp2(tl.load(cs_ptr + ((pid_b * nheads + pid_h) * nchunks + c) * chunk_size + chunk_size - 1))
    if HAS_SEQ:
        seq_end = tl.load(seq_ptr + pid_b * s_seq_b + tl.minimum((c + 1) * chunk_size - 1, seqlen - 1) * s_seq_l)
        seq_in = tl.load(seq_ptr + pid_b * s_seq_b + tl.maximum(c * chunk_size - 1, 0) * s_seq_l)
        scale = tl.where(seq_end == seq_in, scale, 0.0)
    return scale


@triton.jit
def _flat_block_start(start_ptr, nheads, dim, HAS_START: tl.constexpr, BLOCK: tl.constexpr):
    """The flat state-passing kernels' program (grid (blocks, batch, heads)): BLOCK elements of one
    (batch row, head)'s flattened state of `dim` elements. Returns its block and row ids, offsets,
    mask, the (batch, head) base offset, and the float32 value the pass starts from (start_ptr's
    block with HAS_START, else zeros)."""
    pid_blk = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    bh = (pid_b * nheads + pid_h) * dim
    if HAS_START:
        start = tl.load(start_ptr + bh + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        start = tl.zeros((BLOCK,), dtype=tl.float32)
    return pid_blk, pid_b, pid_h, offs, mask, bh, start


@triton.jit
def _store_state(ptr, lp_ptr, off, value, mask, STORE_LP: tl.constexpr, STORE_F32: tl.constexpr):
    """Store a float32 state (or state gradient) tile (unless not STORE_F32: only the copy is wanted),
    and with STORE_LP its copy in lp_ptr's dtype."""
    if STORE_F32:
        tl.store(ptr + off, value, mask=mask)
    if STORE_LP:
        tl.store(lp_ptr + off, value.to(lp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_outer_kernel(
    a_ptr, b_ptr, dtp_ptr, cs_ptr, seq_ptr, out_ptr,
    seqlen, nheads, nchunks, chunk_size, hdim, dstate, heads_per_group,
    s_a_b, s_a_l, s_a_h, s_a_p, s_b_b, s_b_l, s_b_g, s_b_n, s_seq_b, s_seq_l,
    MODE: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out[b, c, h] (hdim x dstate, float32) = sum_k a[k, :]^T wt_k b[k, :] over chunk c's positions k;
    grid (p x n tiles, batch x chunks, heads), a (BLOCK_P, BLOCK_N) tile each.

    MODE 0 (chunk states): a = x, b = B, wt = exp2(cs_last - cs_k) dtp_k [seq_k == seq_end].
    MODE 1 (backward dprev): a = dy, b = C, wt = exp2(cs_k) [seq_k == seq of the state entering].
    """
    pid_pn = tl.program_id(0)
    pid_bc = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    pid_g = pid_h // heads_per_group
    num_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // num_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    t0 = pid_c * chunk_size
    cs_base = ((pid_b * nheads + pid_h) * nchunks + pid_c) * chunk_size
    cs_last = tl.load(cs_ptr + cs_base + chunk_size - 1)
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * s_seq_b
        if MODE == 0:
            seq_ref = tl.load(seq_base + tl.minimum(t0 + chunk_size - 1, seqlen - 1) * s_seq_l)
        else:
            seq_ref = tl.load(seq_base + tl.maximum(t0 - 1, 0) * s_seq_l)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, chunk_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        t = t0 + offs_k
        kmask = t < seqlen
        aT = tl.load(
            a_ptr + pid_b * s_a_b + pid_h * s_a_h + t[None, :] * s_a_l + offs_p[:, None] * s_a_p,
            mask=kmask[None, :] & (offs_p < hdim)[:, None], other=0.0,
        )
        bb = tl.load(
            b_ptr + pid_b * s_b_b + pid_g * s_b_g + t[:, None] * s_b_l + offs_n[None, :] * s_b_n,
            mask=kmask[:, None] & (offs_n < dstate)[None, :], other=0.0,
        )
        cs_k = tl.load(cs_ptr + cs_base + offs_k)
        if MODE == 0:
            wt = tl.math.exp2(cs_last - cs_k) * tl.load(dtp_ptr + cs_base + offs_k)
        else:
            wt = tl.math.exp2(cs_k)
        if HAS_SEQ:
            seq_k = tl.load(seq_base + tl.minimum(t, seqlen - 1) * s_seq_l)
            wt = tl.where(seq_k == seq_ref, wt, 0.0)
        acc = _dot_f32_operand(acc, aT * wt[None, :], bb, True, SPLIT, DOT_PREC)
    mask = (offs_p < hdim)[:, None] & (offs_n < dstate)[None, :]
    tile = offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(out_ptr + ((pid_b * nchunks + pid_c) * nheads + pid_h) * hdim * dstate + tile, acc, mask=mask)


@triton.jit
def _state_pass_fwd_kernel(
    states_ptr, cs_ptr, seq_ptr, init_ptr, prev_ptr, prev_lp_ptr, final_ptr,
    seqlen, nheads, nchunks, chunk_size, dim, s_seq_b, s_seq_l,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, STORE_LP: tl.constexpr, STORE_F32: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, pid_b, pid_h, offs, mask, bh, s = _flat_block_start(init_ptr, nheads, dim, HAS_INIT, BLOCK)
    for c in range(nchunks):
        off = ((pid_b * nchunks + c) * nheads + pid_h) * dim + offs
        _store_state(prev_ptr, prev_lp_ptr, off, s, mask, STORE_LP, STORE_F32)
        st = tl.load(states_ptr + off, mask=mask, other=0.0)
        scale = _chunk_scale(cs_ptr, seq_ptr, pid_b, pid_h, c, nheads, nchunks, chunk_size, seqlen, s_seq_b, s_seq_l,
                             HAS_SEQ)
        s = scale * s + st
    tl.store(final_ptr + bh + offs, s, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers


_chunk_outer_tuned = autotune_per_chunk(_chunk_outer_kernel, configs_of([
    (dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=64), 4, 2), (dict(BLOCK_P=64, BLOCK_N=128, BLOCK_K=64), 4, 3),
    (dict(BLOCK_P=64, BLOCK_N=128, BLOCK_K=32), 4, 3), (dict(BLOCK_P=64, BLOCK_N=128, BLOCK_K=64), 8, 2),
    (dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32), 4, 3),
]), key=["chunk_size", "hdim", "dstate", "MODE", "HAS_SEQ", "SPLIT"], chunk_params=("BLOCK_K",))


def chunk_outer(a, b, dtp, cs, seq_idx, chunk_size, mode, dot_prec, config=None):
    """MODE 0: chunk states from (x, B); MODE 1: dprev from (dy, C). -> (batch, nchunks, nheads, hdim, dstate).
    config: an index into the kernel's config list, that config (benchmarks, tests; the interpreter
    runs its own tiles)."""
    batch, seqlen, nheads, hdim = a.shape
    ngroups, dstate = b.shape[2], b.shape[3]
    nchunks = cdiv(seqlen, chunk_size)
    out = torch.empty(batch, nchunks, nheads, hdim, dstate, device=a.device, dtype=torch.float32)
    bs = _blocks(chunk_size, hdim, dstate)
    seq, seq_s = seq_args(seq_idx, dtp)
    args = (a, b, dtp, cs, seq, out, seqlen, nheads, nchunks, chunk_size, hdim, dstate, nheads // ngroups,
            *a.stride(), *b.stride(), *seq_s)
    kw = dict(MODE=mode, HAS_SEQ=seq_idx is not None, DOT_PREC=dot_prec, SPLIT=b.dtype != torch.float32)
    if INTERPRET:
        BP, BN = bs["P"], bs["N"]
        grid = (cdiv(hdim, BP) * cdiv(dstate, BN), batch * nchunks, nheads)
        _chunk_outer_kernel[grid](*args, **kw, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=bs["K"], num_warps=4)
    else:
        def grid(meta):
            return (cdiv(hdim, meta["BLOCK_P"]) * cdiv(dstate, meta["BLOCK_N"]), batch * nchunks, nheads)

        launcher = (_chunk_outer_tuned(chunk_size) if config is None else
                    _chunk_outer_tuned.with_config(config, chunk_size))
        launcher[grid](*args, **kw)
    return out


def states_and_pass(x, B, dtp, cs, seq_idx, initial_states, chunk_size, dot_prec, store_lp=True, store_f32=True):
    """Steps 3 and 4 (chunk_outer, then state_pass): -> prev (the state entering each chunk,
    (batch, nchunks, nheads, headdim, dstate) float32), prev_lp (the same in x's dtype, for the chunk
    scan; None without store_lp, and prev itself for float32 x), final state (batch, nheads, headdim,
    dstate) float32. store_f32 False (bf16/fp16 x with store_lp: a forward whose backward will not
    read the float32 prev): prev is not written (None), only prev_lp, saving a float32 state per
    chunk and head of writes (and its memory). With or without store_lp the chunk states' kernel
    sees the same autotuner key: the backward's rerun gets the forward's config, hence its bits."""
    lp = store_lp and x.dtype != torch.float32
    f32 = store_f32 or not lp  # without a low-precision copy the float32 prev is the only output
    states = chunk_outer(x, B, dtp, cs, seq_idx, chunk_size, 0, dot_prec)
    prev, prev_lp, final = state_pass(states, cs, seq_idx, initial_states, x.shape[1], chunk_size,
                                      x.dtype if lp else torch.float32, store_f32=f32)
    return prev, (prev_lp if store_lp else None), final


def state_pass(states, cs, seq_idx, initial_states, seqlen, chunk_size, lp_dtype=torch.float32, store_f32=True):
    """-> prev (state entering each chunk, float32; None when not store_f32, which needs a
    low-precision lp_dtype), prev_lp (the same in lp_dtype: the chunk scan rounds it to the input
    dtype for its dots anyway, so it reads half the bytes), final state."""
    batch, nchunks, nheads, hdim, dstate = states.shape
    dim = hdim * dstate
    store_lp = lp_dtype != torch.float32
    if not (store_f32 or store_lp):
        raise ValueError("state_pass: store_f32=False needs a low-precision lp_dtype (else nothing is stored)")
    prev = torch.empty_like(states) if store_f32 else states.new_empty(1)
    prev_lp = torch.empty(states.shape, device=states.device, dtype=lp_dtype) if store_lp else prev
    final = torch.empty(batch, nheads, hdim, dstate, device=states.device, dtype=torch.float32)
    BLOCK = next_power_of_2(dim) if INTERPRET else min(1024, next_power_of_2(dim))
    init = initial_states.contiguous() if initial_states is not None else states
    seq, seq_s = seq_args(seq_idx, cs)
    grid = (cdiv(dim, BLOCK), batch, nheads)
    _state_pass_fwd_kernel[grid](
        states, cs, seq, init, prev, prev_lp, final, seqlen, nheads, nchunks, chunk_size, dim, *seq_s,
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, STORE_LP=store_lp, STORE_F32=store_f32,
        BLOCK=BLOCK, num_warps=4,
    )
    return (prev if store_f32 else None), prev_lp, final
