"""Triton SSD scan wired into autograd (a tensor-only torch.autograd.Function).

Owns `ssd_scan` for the Triton path: argument checks that only the Triton path needs (chunk
size a power of two >= 16), the forward (triton_fwd) and backward (triton_bwd) orchestration,
and the SiLU gate backward (PyTorch elementwise; the rest of the backward tail, from d(cumsum dA)
to ddt, dA and d dt_bias, is the fused triton_bwd.dt_bwd kernel).
Shapes as in kernels.ssd.reference.
"""

from __future__ import annotations

import torch

from kernels._triton_utils import dot_precision
from kernels.ssd import triton_bwd as bwd
from kernels.ssd import triton_fwd as fwd
from kernels.ssd.reference import _check_shapes


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_limit):
        batch, seqlen, nheads, hdim = x.shape
        prec = dot_precision(x.dtype)
        dtp, cs = fwd.dt_cumsum(dt, dt_bias, A, chunk_size, dt_softplus, dt_limit)
        cb = fwd.compute_cb(C, B, chunk_size, prec)
        states = fwd.chunk_outer(x, B, dtp, cs, seq_idx, chunk_size, 0, prec)
        prev, prev_lp, final = fwd.state_pass(states, cs, seq_idx, initial_states, seqlen, chunk_size, x.dtype)
        del states
        out, ypre = fwd.chunk_scan(cb, x, z, D, C, prev_lp, dtp, cs, seq_idx, chunk_size, z is not None, prec)
        ypre = ypre if z is not None else None  # only the gate's backward needs it
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, prev_lp, final, dtp, cs)
        ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit = chunk_size, dt_softplus, dt_limit
        ctx.has_init = initial_states is not None
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, prev_lp, final, dtp, cs = ctx.saved_tensors
        Q = ctx.chunk_size
        batch, seqlen, nheads, hdim = x.shape
        ngroups = B.shape[2]
        prec = dot_precision(x.dtype)
        if dout is None:
            dout = torch.zeros_like(x)
        dz = None
        if z is not None:
            zf = z.float()
            sig = torch.sigmoid(zf)
            doutf = dout.float()
            dz = (doutf * ypre.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
            dy = (doutf * zf * sig).to(x.dtype)
        else:
            dy = dout.to(x.dtype)
        dprev = fwd.chunk_outer(dy, C, dtp, cs, seq_idx, Q, 1, prec)
        dS, dS_lp, dinit, dcs_last = bwd.state_pass_bwd(dprev, prev, final, dfinal, cs, seq_idx, seqlen, Q, x.dtype)
        del dprev
        dx, ddtp, dcs, dD = bwd.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq_idx, Q, prec)
        dcb, dcs_rows = bwd.chunk_dcb(x, dy, dtp, cs, seq_idx, cb, ngroups, Q, prec)
        dB, dC, dcs_offd = bwd.chunk_dbc(x, dy, B, C, prev_lp, dS_lp, dcb, dtp, cs, seq_idx, Q, prec)
        del dcb, dS, dS_lp
        ddt, dA, ddt_bias = bwd.dt_bwd(dcs, dcs_rows, dcs_offd, dcs_last, ddtp, dtp, dt, dt_bias, A,
                                       ctx.dt_softplus, ctx.dt_limit)
        dA = dA.to(A.dtype)
        ddt_bias = ddt_bias.to(dt_bias.dtype) if dt_bias is not None else None
        if dD is not None:
            dD = dD.to(D.dtype)
        dinit = dinit if ctx.has_init else None
        return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, None, dinit, None, None, None


def ssd_scan(
    x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), seq_idx=None, initial_states=None, return_final_states=False,
):
    """Triton SSD scan; same contract as kernels.ssd.reference.ssd_scan (final states float32)."""
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states)
    Q = int(chunk_size)
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"the Triton SSD scan needs chunk_size a power of two >= 16, got {chunk_size}")
    if B.dtype != x.dtype:
        B = B.to(x.dtype)
    if C.dtype != x.dtype:
        C = C.to(x.dtype)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    if initial_states is not None:
        initial_states = initial_states.float().contiguous()
    out, final = _SSDScan.apply(
        x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, Q, bool(dt_softplus),
        (float(dt_limit[0]), float(dt_limit[1])),
    )
    return (out, final) if return_final_states else out


__all__ = ["ssd_scan"]
