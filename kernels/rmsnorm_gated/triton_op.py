"""Triton grouped RMSNorm with SiLU gate, forward and backward (torch.library custom ops, opaque to
torch.compile: kernels/__init__.py).

Owns `rmsnorm_gated` for the Triton path and `rmsnorm_gated_bwd`. Shapes as in
kernels.rmsnorm_gated.reference: y, z (..., d), weight (d,), group_size divides d. Rows are
flattened; grid (row blocks, groups); each forward program normalises BLOCK_R rows of one group.
The forward saves only the per-row-group rstd (float32); in the backward a bounded number of
programs per group each walk many rows, BLOCK_R at a time, and keep dweight in registers; their
partials are reduced by torch in a fixed order (no atomics). On CUDA the backward's schedule
(rows per block, warps, next block's loads issued early) is autotuned over bwd_schedules.
All offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._autograd_op import ANY_STRIDES_IN_ORDER, with_autograd
from kernels._triton_utils import INTERPRET, autotune, cdiv, next_power_of_2
from kernels.rmsnorm_gated.reference import check_args


@triton.jit
def _rms_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, nrows, d, group_size, ngroups, eps,
    s_y_r, s_z_r, s_o_r,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_g * group_size + tl.arange(0, BLOCK_G)
    cmask = tl.arange(0, BLOCK_G) < group_size
    mask = (rows < nrows)[:, None] & cmask[None, :]
    v = tl.load(y_ptr + rows[:, None] * s_y_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            v = v * gate
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / group_size + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    out = v * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            out = out * gate
    tl.store(out_ptr + rows[:, None] * s_o_r + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * ngroups + pid_g, rstd, mask=rows < nrows)


@triton.jit
def _rms_bwd_load(y_ptr, z_ptr, rstd_ptr, dout_ptr, rows, rmask, cols, cmask, pid_g, ngroups,
                  s_y_r, s_z_r, s_g_r, HAS_Z: tl.constexpr):
    """y, dout, z (y again without z) in their own dtypes and rstd for a block of rows of one group."""
    mask = rmask[:, None] & cmask[None, :]
    y = tl.load(y_ptr + rows[:, None] * s_y_r + cols[None, :], mask=mask, other=0.0)
    g = tl.load(dout_ptr + rows[:, None] * s_g_r + cols[None, :], mask=mask, other=0.0)
    z = y
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z_r + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows * ngroups + pid_g, mask=rmask, other=0.0)
    return y, g, z, rstd


@triton.jit
def _rms_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr, nrows, d, group_size, ngroups, rows_per_prog,
    s_y_r, s_z_r, s_g_r, s_dy_r, s_dz_r,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Rows [rows_per_prog * pid_r, +rows_per_prog) of group pid_g, BLOCK_R rows at a time. PREFETCH
    issues the next block's loads before this block's reduction and stores (the loop is otherwise a
    chain of load -> row reduction -> store, one memory latency per block)."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    cols = pid_g * group_size + tl.arange(0, BLOCK_G)
    cmask = tl.arange(0, BLOCK_G) < group_size
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_G,), dtype=tl.float32)
    row0 = pid_r * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, nrows)
    if PREFETCH:
        rows = row0 + tl.arange(0, BLOCK_R)
        y, g, z, rstd = _rms_bwd_load(y_ptr, z_ptr, rstd_ptr, dout_ptr, rows, rows < row_end, cols, cmask, pid_g,
                                      ngroups, s_y_r, s_z_r, s_g_r, HAS_Z)
        for _ in range(0, rows_per_prog, BLOCK_R):
            nxt = rows + BLOCK_R
            yn, gn, zn, rstdn = _rms_bwd_load(y_ptr, z_ptr, rstd_ptr, dout_ptr, nxt, nxt < row_end, cols, cmask,
                                              pid_g, ngroups, s_y_r, s_z_r, s_g_r, HAS_Z)
            dw += _rms_bwd_rows(y, g, z, rstd, dy_ptr, dz_ptr, rows, rows < row_end, cols, cmask, w, group_size,
                                s_dy_r, s_dz_r, HAS_Z, NORM_BEFORE_GATE)
            y, g, z, rstd, rows = yn, gn, zn, rstdn, nxt
    else:
        for r0 in range(0, rows_per_prog, BLOCK_R):
            rows = row0 + r0 + tl.arange(0, BLOCK_R)
            rmask = rows < row_end
            y, g, z, rstd = _rms_bwd_load(y_ptr, z_ptr, rstd_ptr, dout_ptr, rows, rmask, cols, cmask, pid_g,
                                          ngroups, s_y_r, s_z_r, s_g_r, HAS_Z)
            dw += _rms_bwd_rows(y, g, z, rstd, dy_ptr, dz_ptr, rows, rmask, cols, cmask, w, group_size,
                                s_dy_r, s_dz_r, HAS_Z, NORM_BEFORE_GATE)
    tl.store(dw_ptr + pid_r * d + cols, dw, mask=cmask)


@triton.jit
def _rms_bwd_rows(y, g, z, rstd, dy_ptr, dz_ptr, rows, rmask, cols, cmask, w, group_size, s_dy_r, s_dz_r,
                  HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """Stores dy (and dz) for a block of loaded rows of one group; returns its dweight contribution."""
    mask = rmask[:, None] & cmask[None, :]
    y = y.to(tl.float32)
    g = g.to(tl.float32)
    v = y
    if HAS_Z:
        z = z.to(tl.float32)
        sg = tl.sigmoid(z)
        gate = z * sg
        dgate = sg * (1.0 + z * (1.0 - sg))
        if NORM_BEFORE_GATE:
            n = y * rstd[:, None]
            dz = g * n * w[None, :] * dgate
            g = g * gate
        else:
            v = y * gate
            n = v * rstd[:, None]
    else:
        n = v * rstd[:, None]
    dn = g * w[None, :]
    dv = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / group_size)[:, None])
    if HAS_Z:
        if NORM_BEFORE_GATE:
            dy = dv
        else:
            dy = dv * gate
            dz = dv * y * dgate
        tl.store(dz_ptr + rows[:, None] * s_dz_r + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        dy = dv
    tl.store(dy_ptr + rows[:, None] * s_dy_r + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
    return tl.sum(g * n, axis=0)


def _rows(t, d):
    t2 = t.reshape(-1, d)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _block_r(nrows, group_size):
    """Forward rows per program: about 4096 elements per program."""
    if INTERPRET:
        return 4  # small blocks so that the tests walk several row blocks per program
    return max(1, min(16, 4096 // next_power_of_2(group_size)))


# the backward's rows per program is a multiple of this (the largest BLOCK_R of any schedule), so the
# grid and the dweight partials do not depend on the schedule the autotuner picks
_ROW_ALIGN = 16


def bwd_schedules(block_g: int) -> list[triton.Config]:
    """The backward's launch schedules for groups of block_g (a power of two) channels: rows per
    block (BLOCK_R), warps, PREFETCH. The first is the fixed one (kernels.deterministic, and the
    schedule before the autotuned list: ~4096 elements per block, 4 warps up to 1024 channels, else 8,
    no prefetch); the others hold more bytes in flight per SM: the next block's loads issued early,
    more warps, larger or smaller blocks."""
    def rows(elems):
        return max(1, min(_ROW_ALIGN, elems // block_g))

    base_warps = 4 if block_g <= 1024 else 8
    space = [(rows(4096), base_warps, False), (rows(4096), base_warps, True), (rows(4096), 2 * base_warps, True),
             (rows(8192), 2 * base_warps, False), (rows(2048), 4, True), (rows(8192), 2 * base_warps, True)]
    out, seen = [], set()
    for r, w, pf in space:
        if (r, w, pf) not in seen:
            seen.add((r, w, pf))
            out.append(triton.Config({"BLOCK_R": r, "PREFETCH": pf}, num_warps=w, num_stages=1))
    return out


_bwd_launchers = {}


def _bwd_launcher(block_g: int):
    """The autotuned backward for groups of block_g channels (one tuner per block_g: the schedules
    depend on it). Key: the row width and the flags; not the row count (no retuning per batch)."""
    if block_g not in _bwd_launchers:
        _bwd_launchers[block_g] = autotune(
            bwd_schedules(block_g), key=["d", "group_size", "HAS_Z", "NORM_BEFORE_GATE"],
            interpret_config=triton.Config({"BLOCK_R": 4, "PREFETCH": True}, num_warps=4, num_stages=1),
        )(_rms_bwd_kernel)
    return _bwd_launchers[block_g]


def rmsnorm_gated_bwd(y2, z2, weight, rstd, dout2, group_size, norm_before_gate, schedule=None, dz=None):
    """dy, dz (None without z), dweight (float32) from the forward's saved rows. y2, z2, dout2 (nrows, d)
    with unit column stride; rstd (nrows, ngroups) float32. `schedule`: a triton.Config of
    bwd_schedules to launch instead of the autotuned choice (benchmarks and tests). `dz`, optional:
    the (nrows, d) tensor to write dz into (z2's dtype, unit column stride: a column slice of a
    larger gradient)."""
    nrows, d = y2.shape
    ngroups = d // group_size
    dy = torch.empty(y2.shape, device=y2.device, dtype=y2.dtype)
    if dz is None and z2 is not None:
        dz = torch.empty(z2.shape, device=z2.device, dtype=z2.dtype)
    # a bounded number of programs per group, each walking many rows: dweight partials stay small
    nprog = min(cdiv(nrows, _ROW_ALIGN), 2 if INTERPRET else max(1, 1024 // ngroups))
    rows_per_prog = cdiv(cdiv(nrows, nprog), _ROW_ALIGN) * _ROW_ALIGN
    nprog = cdiv(nrows, rows_per_prog)
    dw = torch.empty(nprog, d, device=y2.device, dtype=torch.float32)
    zz = z2 if z2 is not None else y2
    dzz = dz if dz is not None else dy
    block_g = next_power_of_2(group_size)
    args = (y2, zz, weight, rstd, dout2, dy, dzz, dw, nrows, d, group_size, ngroups, rows_per_prog,
            y2.stride(0), zz.stride(0), dout2.stride(0), dy.stride(0), dzz.stride(0))
    flags = dict(HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK_G=block_g)
    if schedule is None:
        _bwd_launcher(block_g)[(nprog, ngroups)](*args, **flags)
    else:
        _rms_bwd_kernel[(nprog, ngroups)](*args, **flags, **schedule.kwargs, num_warps=schedule.num_warps,
                                          num_stages=schedule.num_stages)
    return dy, dz, dw.sum(0)


def rmsnorm_gated_fwd(y, z, weight, group_size, eps, norm_before_gate):
    """out (y's shape and dtype, contiguous), rstd (rows, ngroups) float32 for the backward."""
    d = y.shape[-1]
    y2 = _rows(y, d)
    z2 = _rows(z, d) if z is not None else None
    nrows, ngroups = y2.shape[0], d // group_size
    out = torch.empty(y2.shape, device=y.device, dtype=y.dtype)
    rstd = torch.empty(nrows, ngroups, device=y.device, dtype=torch.float32)
    BR = _block_r(nrows, group_size)
    _rms_fwd_kernel[(cdiv(nrows, BR), ngroups)](
        y2, z2 if z2 is not None else y2, weight, out, rstd, nrows, d, group_size, ngroups, eps,
        y2.stride(0), (z2 if z2 is not None else y2).stride(0), out.stride(0),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK_R=BR,
        BLOCK_G=next_power_of_2(group_size), num_warps=4,
    )
    return out.reshape(y.shape), rstd


# Custom ops: opaque to torch.compile, which traces the block around them (kernels/__init__.py).
# Inputs may have any strides in the usual order (_rows takes any row stride).
@torch.library.custom_op("hybrid_pretrain::rmsnorm_gated_fwd", mutates_args=(), tags=ANY_STRIDES_IN_ORDER,
                         schema="(Tensor y, Tensor? z, Tensor weight, int group_size, float eps, "
                                "bool norm_before_gate) -> (Tensor, Tensor)")
def _fwd_op(y, z, weight, group_size, eps, norm_before_gate):
    return rmsnorm_gated_fwd(y, z, weight, group_size, eps, norm_before_gate)


@_fwd_op.register_fake
def _(y, z, weight, group_size, eps, norm_before_gate):
    nrows = y.numel() // y.shape[-1]
    return y.new_empty(y.shape), y.new_empty(nrows, y.shape[-1] // group_size, dtype=torch.float32)


@torch.library.custom_op("hybrid_pretrain::rmsnorm_gated_bwd", mutates_args=(), tags=ANY_STRIDES_IN_ORDER,
                         schema="(Tensor dout, Tensor y, Tensor? z, Tensor weight, Tensor rstd, int group_size, "
                                "bool norm_before_gate) -> (Tensor, Tensor, Tensor)")
def _bwd_op(dout, y, z, weight, rstd, group_size, norm_before_gate):
    d = y.shape[-1]
    dy, dz, dw = rmsnorm_gated_bwd(_rows(y, d), _rows(z, d) if z is not None else None, weight, rstd,
                                   _rows(dout, d), group_size, norm_before_gate)
    dz = dz.reshape(y.shape) if dz is not None else y.new_empty(0)
    return dy.reshape(y.shape), dz, dw.to(weight.dtype)


@_bwd_op.register_fake
def _(dout, y, z, weight, rstd, group_size, norm_before_gate):
    return y.new_empty(y.shape), (z.new_empty(y.shape) if z is not None else y.new_empty(0)), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    y, z, weight, group_size, eps, norm_before_gate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, z, weight, output[1])
    ctx.cfg = (group_size, norm_before_gate)


def _grads(ctx, dout, _drstd):
    y, z, weight, rstd = ctx.saved_tensors
    if dout is None:
        return (None,) * 6
    dy, dz, dw = _bwd_op(dout, y, z, weight, rstd, *ctx.cfg)
    return dy, dz if z is not None else None, dw, None, None, None


_norm_fwd = with_autograd(_fwd_op, _grads, _setup)


def rmsnorm_gated(y, z, weight, *, group_size, eps=1e-5, norm_before_gate=False):
    """Triton gated grouped RMSNorm; same contract as kernels.rmsnorm_gated.reference."""
    check_args(y, z, weight, group_size)
    return _norm_fwd(y, z, weight.contiguous(), int(group_size), float(eps), bool(norm_before_gate))[0]
