"""Triton causal depthwise conv1d (channel-last), forward and backward, with fused SiLU and seq_idx.

Owns `causal_conv1d` for the Triton path (torch.library custom ops for the forward and the backward,
opaque to torch.compile, kernels/__init__.py) and its kernels.
Shapes as in kernels.conv1d.reference: x (batch, seqlen, dim), weight (dim, width) width 2..4,
bias (dim,), seq_idx (batch, seqlen). All offsets are 64-bit; x and dout may have any strides.

Forward: grid (position blocks, channel blocks, batch), one (BLOCK_L, BLOCK_D) tile each; on CUDA
the tile is autotuned over FWD_SCHEDULES (the output bits do not depend on it).

Backward: one kernel, grid (segments of SEG positions, channel blocks, batch). A program streams
through its segment one position (a BLOCK_D row of channels) at a time, four rows loaded per
iteration, keeping the last WIDTH-1 rows of x, dpre and seq_idx in registers, so that each x and
dout element is loaded once and every shift is a register rename:
  dpre[t] = dout[t] * silu'(pre[t]), pre recomputed from x[t-WIDTH+1 .. t] (no extra activation
  memory), then, WIDTH-1 rows behind, for v = t - (WIDTH-1):
  dx[v] = sum_s w[:, W-1-s] dpre[v+s],  dweight[:, W-1-s] += x[v] dpre[v+s],  dbias += dpre[v]
(pairs (v, v+s) in one document only). A segment also reads the WIDTH-1 rows of x before it and
recomputes dpre for the WIDTH-1 rows after it (its halo). dweight/dbias partials are written per
(batch row, segment) and reduced by torch in a fixed order: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._autograd_op import with_autograd
from kernels._triton_utils import INTERPRET, autotune, cdiv, next_power_of_2


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
def _row(row_ptr, t, s_l, seqlen, dmask):
    """float32 row t (this program's channels) of a (seqlen, channels) slice; zeros outside 0..seqlen-1."""
    return tl.load(row_ptr + t * s_l, mask=dmask & (t >= 0) & (t < seqlen), other=0.0).to(tl.float32)


@triton.jit
def _seq_at(seq_ptr, t, s_seq_l, seqlen, HAS_SEQ: tl.constexpr):
    """seq_idx at position t clamped into 0..seqlen-1 (a scalar; 0 without seq_idx)."""
    if HAS_SEQ:
        q = tl.load(seq_ptr + tl.minimum(tl.maximum(t, 0), seqlen - 1) * s_seq_l).to(tl.int64)
    else:
        q = tl.zeros((), dtype=tl.int64)
    return q


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, seqlen, dim, nseg,
    s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_seq_b, s_seq_l, s_g_b, s_g_l, s_g_d, s_dx_b, s_dx_l, s_dx_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, SEG: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Positions [SEG*pid_s, +SEG) x one channel block x one batch row. The tuples xh, dh, qh hold x,
    dpre and seq_idx of rows t, t-1, .., t-3 (entries past WIDTH-1 unused); w[s] = weight[:, W-1-s]
    is the tap of shift s. No helper calls inside the loop: the interpreter pays per call."""
    LAG: tl.constexpr = WIDTH - 1
    pid_s = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < dim
    seg0 = pid_s * SEG
    seg_end = tl.minimum(seg0 + SEG, seqlen)
    x_row = x_ptr + pid_b * s_x_b + offs_d * s_x_d  # + t * s_x_l: row t
    g_row = dout_ptr + pid_b * s_g_b + offs_d * s_g_d
    dx_row = dx_ptr + pid_b * s_dx_b + offs_d * s_dx_d
    q_ptr = seq_ptr + pid_b * s_seq_b

    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    w0 = tl.load(w_ptr + offs_d * s_w_d + (WIDTH - 1) * s_w_k, mask=dmask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + offs_d * s_w_d + (WIDTH - 2) * s_w_k, mask=dmask, other=0.0).to(tl.float32)
    w2 = zero
    w3 = zero
    if WIDTH > 2:
        w2 = tl.load(w_ptr + offs_d * s_w_d + (WIDTH - 3) * s_w_k, mask=dmask, other=0.0).to(tl.float32)
    if WIDTH > 3:
        w3 = tl.load(w_ptr + offs_d * s_w_d, mask=dmask, other=0.0).to(tl.float32)
    w = (w0, w1, w2, w3)
    bias = zero
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)

    # history before the segment (entries 0, 1, 2 = rows seg0-1, -2, -3; shifted by one as each row
    # arrives): x and seq_idx of the WIDTH-1 previous rows, the pre-activation's halo (zeros before
    # position 0); dpre there is never used (those rows' dx belong to the previous segment)
    q3 = _seq_at(q_ptr, seg0 - 3, s_seq_l, seqlen, HAS_SEQ)
    xh = (_row(x_row, seg0 - 1, s_x_l, seqlen, dmask), _row(x_row, seg0 - 2, s_x_l, seqlen, dmask),
          _row(x_row, seg0 - 3, s_x_l, seqlen, dmask), zero)
    qh = (_seq_at(q_ptr, seg0 - 1, s_seq_l, seqlen, HAS_SEQ), _seq_at(q_ptr, seg0 - 2, s_seq_l, seqlen, HAS_SEQ),
          q3, q3)
    dh = (zero, zero, zero, zero)
    dw = (zero, zero, zero, zero)  # dw[s]: dweight[:, W-1-s] partial
    db = zero

    # rows t = seg0 .. seg_end + LAG - 1 (dx runs LAG rows behind), four per iteration
    for j in range(0, tl.cdiv(seg_end - seg0 + LAG, 4)):
        tb = seg0 + j * 4
        # the four rows' loads first (memory-level parallelism), then the rows in order
        xs4 = (tl.load(x_row + tb * s_x_l, mask=dmask & (tb < seqlen), other=0.0),
               tl.load(x_row + (tb + 1) * s_x_l, mask=dmask & (tb + 1 < seqlen), other=0.0),
               tl.load(x_row + (tb + 2) * s_x_l, mask=dmask & (tb + 2 < seqlen), other=0.0),
               tl.load(x_row + (tb + 3) * s_x_l, mask=dmask & (tb + 3 < seqlen), other=0.0))
        gs4 = (tl.load(g_row + tb * s_g_l, mask=dmask & (tb < seqlen), other=0.0),
               tl.load(g_row + (tb + 1) * s_g_l, mask=dmask & (tb + 1 < seqlen), other=0.0),
               tl.load(g_row + (tb + 2) * s_g_l, mask=dmask & (tb + 2 < seqlen), other=0.0),
               tl.load(g_row + (tb + 3) * s_g_l, mask=dmask & (tb + 3 < seqlen), other=0.0))
        if HAS_SEQ:
            qs4 = (tl.load(q_ptr + tl.minimum(tb, seqlen - 1) * s_seq_l).to(tl.int64),
                   tl.load(q_ptr + tl.minimum(tb + 1, seqlen - 1) * s_seq_l).to(tl.int64),
                   tl.load(q_ptr + tl.minimum(tb + 2, seqlen - 1) * s_seq_l).to(tl.int64),
                   tl.load(q_ptr + tl.minimum(tb + 3, seqlen - 1) * s_seq_l).to(tl.int64))
        for i in tl.static_range(4):
            xh = (xs4[i].to(tl.float32), xh[0], xh[1], xh[2])
            if HAS_SEQ:
                qh = (qs4[i], qh[0], qh[1], qh[2])
            g = gs4[i].to(tl.float32)
            if SILU:
                # pre[t] = bias + sum_s w[s] x[t-s] (same document; rows before 0 are zero). seq_idx
                # is a scalar per row: the rare rows whose window crosses a document boundary take a
                # (uniform) branch that masks the other documents' rows
                cross = False
                if HAS_SEQ:
                    for s in tl.static_range(1, WIDTH):
                        cross = cross | (qh[s] != qh[0])
                if cross:
                    pre = xh[0] * w[0] + bias
                    for s in tl.static_range(1, WIDTH):
                        pre += tl.where(qh[s] == qh[0], xh[s], 0.0) * w[s]
                else:
                    pre = xh[0] * w[0] + bias
                    for s in tl.static_range(1, WIDTH):
                        pre += xh[s] * w[s]
                sg = tl.sigmoid(pre)
                dh = (g * sg * (1.0 + pre * (1.0 - sg)), dh[0], dh[1], dh[2])
            else:
                dh = (g, dh[0], dh[1], dh[2])
            # row v = t - LAG, if in this segment: dx[v] = sum_s w[s] dpre[v+s] (same document), and its
            # dweight/dbias terms (dh[LAG - s] = dpre[v+s])
            v = tb + i - LAG
            if (v >= seg0) & (v < seg_end):
                xv = xh[LAG]
                dx = dh[LAG] * w[0]
                dw = (dw[0] + xv * dh[LAG], dw[1], dw[2], dw[3])
                db += dh[LAG]
                cross = False
                if HAS_SEQ:
                    for s in tl.static_range(1, WIDTH):
                        cross = cross | (qh[LAG - s] != qh[LAG])
                if cross:
                    for s in tl.static_range(1, WIDTH):
                        ds = tl.where(qh[LAG - s] == qh[LAG], dh[LAG - s], 0.0)
                        dx += ds * w[s]
                        if s == 1:
                            dw = (dw[0], dw[1] + xv * ds, dw[2], dw[3])
                        elif s == 2:
                            dw = (dw[0], dw[1], dw[2] + xv * ds, dw[3])
                        else:
                            dw = (dw[0], dw[1], dw[2], dw[3] + xv * ds)
                else:
                    for s in tl.static_range(1, WIDTH):
                        dx += dh[LAG - s] * w[s]
                        if s == 1:
                            dw = (dw[0], dw[1] + xv * dh[LAG - s], dw[2], dw[3])
                        elif s == 2:
                            dw = (dw[0], dw[1], dw[2] + xv * dh[LAG - s], dw[3])
                        else:
                            dw = (dw[0], dw[1], dw[2], dw[3] + xv * dh[LAG - s])
                tl.store(dx_row + v * s_dx_l, dx.to(dx_ptr.dtype.element_ty), mask=dmask)

    dw_row = dw_ptr + (pid_b * nseg + pid_s) * WIDTH * dim + offs_d
    for s in tl.static_range(WIDTH):
        tl.store(dw_row + (WIDTH - 1 - s) * dim, dw[s], mask=dmask)
    if HAS_BIAS:
        tl.store(db_ptr + (pid_b * nseg + pid_s) * dim + offs_d, db, mask=dmask)


# CUDA: a few configs, cached on disk by Triton (every output is fully rewritten by any config). The
# channels per thread, BLOCK_D / (32 num_warps), set the registers (sm_90, width 4, SiLU, seq_idx,
# bias: 2 -> ~63, 4 -> ~116, 8 -> ~220, none spill); more per thread is more ILP, fewer resident warps.
# Interpreter: 64 channels.
_conv_bwd_tuned = autotune(
    [triton.Config({"BLOCK_D": 128}, num_warps=1, num_stages=1),
     triton.Config({"BLOCK_D": 256}, num_warps=2, num_stages=1),
     triton.Config({"BLOCK_D": 512}, num_warps=4, num_stages=1),
     triton.Config({"BLOCK_D": 256}, num_warps=1, num_stages=1),
     triton.Config({"BLOCK_D": 64}, num_warps=1, num_stages=1)],
    key=["dim", "SEG", "WIDTH", "HAS_BIAS", "HAS_SEQ", "SILU"],
    interpret_config=triton.Config({"BLOCK_D": 64}, num_warps=1, num_stages=1),
)(_conv_bwd_kernel)


def _blocks(seqlen, dim):
    """Forward (BLOCK_L, BLOCK_D) in the interpreter: whole-tensor tiles."""
    return next_power_of_2(max(seqlen, 2)), next_power_of_2(max(dim, 2))


# Forward on CUDA: (BLOCK_L, BLOCK_D) tiles; the first is the fixed one (kernels.deterministic; the
# tile used before the list). Wider channel blocks read longer contiguous rows of the channel-last
# input; every config computes each output element with the same operations in the same order, so
# the output bits do not depend on the choice (the SSD's conv_source rerun relies on that).
# The first six all spill registers at width 4 with bias, SiLU and seq_idx (bench/kernels_static.py,
# Triton 3.6, sm_90a: each thread holds WIDTH shifted copies of its share of the tile); the ones
# after them hold at most 16-32 elements per thread and do not.
FWD_SCHEDULES = [triton.Config({"BLOCK_L": bl, "BLOCK_D": bd}, num_warps=w, num_stages=1)
                 for bl, bd, w in ((64, 64, 4), (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (8, 512, 4),
                                   (16, 128, 4), (8, 256, 4), (16, 256, 8), (8, 512, 8), (4, 512, 4), (64, 64, 8))]
_conv_fwd_tuned = autotune(FWD_SCHEDULES, key=["dim", "WIDTH", "HAS_BIAS", "HAS_SEQ", "SILU"])(_conv_fwd_kernel)


def _seg_len(batch, seqlen, dim):
    """Positions per backward program: the largest power of two in 32..1024 that still gives >= 8192
    programs at 128 channels (~4 waves of the ~17 resident one-warp programs per SM of an H100: the
    programs are equally long, so the tail wave is a small part). Longer segments mean fewer
    dweight/dbias partials (W*4 bytes per segment and channel) and halo rows (WIDTH-1 recomputed
    dpre rows per segment). Interpreter: 16 (several segments in the tests)."""
    if INTERPRET:
        return 16
    rows = batch * cdiv(dim, 128)
    seg = 32
    while seg < 1024 and rows * cdiv(seqlen, 2 * seg) >= 8192:
        seg *= 2
    return seg


def conv_forward(x, weight, bias, seq_idx, silu: bool, schedule=None) -> torch.Tensor:
    """The forward kernel alone (no autograd): out (batch, seqlen, dim) in x's dtype. Deterministic,
    whatever the tile: the SSD scan reruns it in its backward to get back x, B and C bit for bit
    (kernels.ssd conv_source). `schedule`: one of FWD_SCHEDULES instead of the autotuned choice
    (benchmarks and tests)."""
    batch, seqlen, dim = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    seq = seq_idx if seq_idx is not None else x
    args = (x, weight, bias if bias is not None else weight, seq, out, seqlen, dim,
            *x.stride(), *weight.stride(), *(seq_idx.stride() if seq_idx is not None else (0, 0)), *out.stride())
    flags = dict(WIDTH=weight.shape[1], HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu)
    if schedule is None and INTERPRET:
        BL, BD = _blocks(seqlen, dim)
        schedule = triton.Config({"BLOCK_L": BL, "BLOCK_D": BD}, num_warps=4, num_stages=1)
    if schedule is None:
        _conv_fwd_tuned[lambda meta: (cdiv(seqlen, meta["BLOCK_L"]), cdiv(dim, meta["BLOCK_D"]), batch)](
            *args, **flags)
    else:
        grid = (cdiv(seqlen, schedule.kwargs["BLOCK_L"]), cdiv(dim, schedule.kwargs["BLOCK_D"]), batch)
        _conv_fwd_kernel[grid](*args, **flags, **schedule.kwargs, num_warps=schedule.num_warps,
                               num_stages=schedule.num_stages)
    return out


def conv_backward(dout, x, weight, bias, seq_idx, silu: bool, dx=None):
    """dx (x's shape and dtype), dweight (weight's), dbias (bias's, None without bias). `dx`, optional:
    the tensor to write dx into (x's shape and dtype, any strides: a column slice of a larger gradient)."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    seg = _seg_len(batch, seqlen, dim)
    nseg = cdiv(seqlen, seg)
    if dx is None:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dw = torch.empty(batch * nseg, width, dim, device=x.device, dtype=torch.float32)
    db = torch.empty(batch * nseg, dim, device=x.device, dtype=torch.float32) if bias is not None else dw
    seq = seq_idx if seq_idx is not None else x
    _conv_bwd_tuned[lambda meta: (nseg, cdiv(dim, meta["BLOCK_D"]), batch)](
        x, weight, bias if bias is not None else weight, seq, dout, dx, dw, db, seqlen, dim, nseg,
        *x.stride(), *weight.stride(), *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        *dout.stride(), *dx.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu, SEG=seg,
    )
    dweight = dw.sum(0).t().to(weight.dtype)
    dbias = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


# Custom ops: opaque to torch.compile, which traces the block around them
# (kernels/__init__.py).
@torch.library.custom_op("hybrid_pretrain::causal_conv1d_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, bool silu) -> Tensor")
def _conv_fwd_op(x, weight, bias, seq_idx, silu):
    return conv_forward(x, weight, bias, seq_idx, silu)


@_conv_fwd_op.register_fake
def _(x, weight, bias, seq_idx, silu):
    return x.new_empty(x.shape)  # conv_forward's output: contiguous


@torch.library.custom_op("hybrid_pretrain::causal_conv1d_bwd", mutates_args=(),
                         schema="(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, bool silu)"
                                " -> (Tensor, Tensor, Tensor)")
def _conv_bwd_op(dout, x, weight, bias, seq_idx, silu):
    dx, dweight, dbias = conv_backward(dout, x, weight, bias, seq_idx, silu)
    return dx, dweight, dbias if dbias is not None else x.new_empty(0)


@_conv_bwd_op.register_fake
def _(dout, x, weight, bias, seq_idx, silu):
    dweight = weight.new_empty(weight.shape[::-1]).t()  # dw.sum(0).t(): the transpose of a contiguous
    return x.new_empty(x.shape), dweight, bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu = silu


def _conv_grads(ctx, dout):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dweight, dbias = _conv_bwd_op(dout, x, weight, bias, seq_idx, ctx.silu)
    return dx, dweight, dbias if bias is not None else None, None, None


_conv_fwd = with_autograd(_conv_fwd_op, _conv_grads, _conv_setup)


def causal_conv1d(x, weight, bias=None, *, seq_idx=None, activation=None):
    """Triton causal conv1d; same contract as kernels.conv1d.reference.causal_conv1d."""
    from kernels.conv1d.reference import _check

    _check(x, weight, bias, activation)
    return _conv_fwd(x, weight, bias, seq_idx, activation is not None)
