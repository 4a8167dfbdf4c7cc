"""Triton grouped RMSNorm with SiLU gate, forward and backward (tensor-only autograd.Function).

Owns `rmsnorm_gated` for the Triton path. Shapes as in kernels.rmsnorm_gated.reference: y, z
(..., d), weight (d,), group_size divides d. Rows are flattened; grid (row blocks, groups); each
program normalises BLOCK_R rows of one group. The forward saves only the per-row-group rstd
(float32); in the backward a bounded number of programs per group each walk many rows and keep
dweight in registers; their partials are reduced by torch in a fixed order (no atomics).
All offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import INTERPRET
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
def _rms_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr, nrows, d, group_size, ngroups, rows_per_prog,
    s_y_r, s_z_r, s_g_r, s_dy_r, s_dz_r,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    cols = pid_g * group_size + tl.arange(0, BLOCK_G)
    cmask = tl.arange(0, BLOCK_G) < group_size
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_G,), dtype=tl.float32)
    row0 = pid_r * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        rows = row0 + r0 + tl.arange(0, BLOCK_R)
        rmask = (rows < nrows) & (r0 + tl.arange(0, BLOCK_R) < rows_per_prog)
        dw += _rms_bwd_rows(y_ptr, z_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, rows, rmask, cols, cmask, w, pid_g,
                            ngroups, group_size, s_y_r, s_z_r, s_g_r, s_dy_r, s_dz_r, HAS_Z, NORM_BEFORE_GATE)
    tl.store(dw_ptr + pid_r * d + cols, dw, mask=cmask)


@triton.jit
def _rms_bwd_rows(y_ptr, z_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, rows, rmask, cols, cmask, w, pid_g,
                  ngroups, group_size, s_y_r, s_z_r, s_g_r, s_dy_r, s_dz_r,
                  HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """dy (and dz) for a block of rows of one group; returns this block's dweight contribution."""
    mask = rmask[:, None] & cmask[None, :]
    y = tl.load(y_ptr + rows[:, None] * s_y_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dout_ptr + rows[:, None] * s_g_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows * ngroups + pid_g, mask=rmask, other=0.0)
    v = y
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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


def _warps(group_size):
    return 4 if INTERPRET or group_size <= 1024 else 8


def _block_r(nrows, group_size):
    if INTERPRET:
        return 4  # small blocks so that the tests walk several row blocks per program
    return max(1, min(16, 4096 // triton.next_power_of_2(group_size)))


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps, norm_before_gate):
        d = y.shape[-1]
        y2 = _rows(y, d)
        z2 = _rows(z, d) if z is not None else None
        nrows, ngroups = y2.shape[0], d // group_size
        out = torch.empty(y2.shape, device=y.device, dtype=y.dtype)
        rstd = torch.empty(nrows, ngroups, device=y.device, dtype=torch.float32)
        BR = _block_r(nrows, group_size)
        _rms_fwd_kernel[(triton.cdiv(nrows, BR), ngroups)](
            y2, z2 if z2 is not None else y2, weight, out, rstd, nrows, d, group_size, ngroups, eps,
            y2.stride(0), (z2 if z2 is not None else y2).stride(0), out.stride(0),
            HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK_R=BR,
            BLOCK_G=triton.next_power_of_2(group_size), num_warps=4,
        )
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.cfg = (group_size, norm_before_gate, y.shape)
        return out.reshape(y.shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        group_size, norm_before_gate, shape = ctx.cfg
        d = y2.shape[1]
        nrows, ngroups = y2.shape[0], d // group_size
        g2 = _rows(dout, d)
        dy = torch.empty(y2.shape, device=y2.device, dtype=y2.dtype)
        dz = torch.empty(z2.shape, device=z2.device, dtype=z2.dtype) if z2 is not None else None
        BR = _block_r(nrows, group_size)
        # a bounded number of programs per group, each walking many rows: dweight partials stay small
        nprog = min(triton.cdiv(nrows, BR), 2 if INTERPRET else max(1, 1024 // ngroups))
        rows_per_prog = triton.cdiv(triton.cdiv(nrows, nprog), BR) * BR
        nprog = triton.cdiv(nrows, rows_per_prog)
        dw = torch.empty(nprog, d, device=y2.device, dtype=torch.float32)
        zz = z2 if z2 is not None else y2
        _rms_bwd_kernel[(nprog, ngroups)](
            y2, zz, weight, rstd, g2, dy, dz if dz is not None else dy, dw, nrows, d, group_size, ngroups,
            rows_per_prog,
            y2.stride(0), zz.stride(0), g2.stride(0), dy.stride(0), (dz if dz is not None else dy).stride(0),
            HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK_R=BR,
            BLOCK_G=triton.next_power_of_2(group_size), num_warps=_warps(group_size),
        )
        dz = dz.reshape(shape) if dz is not None else None
        return dy.reshape(shape), dz, dw.sum(0).to(weight.dtype), None, None, None


def rmsnorm_gated(y, z, weight, *, group_size, eps=1e-5, norm_before_gate=False):
    """Triton gated grouped RMSNorm; same contract as kernels.rmsnorm_gated.reference."""
    check_args(y, z, weight, group_size)
    return _RMSNormGated.apply(y, z, weight.contiguous(), int(group_size), float(eps), bool(norm_before_gate))
