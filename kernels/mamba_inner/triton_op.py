"""The Mamba-2 mixer core as one pair of torch.library custom ops (forward, backward) on the Triton
kernels: split of the packed projection, causal conv1d + SiLU, SSD scan, gated RMSNorm
(kernels.mamba_inner.reference is the spec; shapes there).

Why one node: as separate ops (conv, SSD, norm on views of the packed in_proj output), autograd
joins the gradients of the views with two cats: d(x|B|C) of the conv's output from the SSD's dx,
dB and dC, and d(zxbcdt) from the norm's dz, the conv's dx and the SSD's ddt (bandwidth-bound
copies of ~(b*l, 8.5K) elements in each hybrid_1b3 Mamba layer: bench/NOTES_train.md Run 22). Here
the backward allocates d(zxbcdt) and d(xbc) once and each kernel writes its gradient into its
column slice (the kernels' `out`/`dx`/`dz`/`ddt` arguments). The forward runs the same kernels
as the separate ops, and the backward the same kernels on the same inputs: the same bits.

What the backward keeps: zxbcdt (the conv's input, z and dt are its slices), the conv's output
(or with recompute_conv nothing more: the conv reruns), the SSD's output y and the norm's rstd, and
the SSD's residuals (kernels/ssd/triton_op.py; CB and chunk states unless recompute_states).
"""
from __future__ import annotations

import torch

from kernels._autograd_op import ANY_STRIDES_IN_ORDER, with_autograd
from kernels._triton_utils import cdiv
from kernels.conv1d.reference import _check as check_conv
from kernels.conv1d.triton_op import conv_backward, conv_forward
from kernels.mamba_inner.reference import MambaDims, split_packed, split_xbc
from kernels.rmsnorm_gated.reference import check_args as check_norm
from kernels.rmsnorm_gated.triton_op import _rows, rmsnorm_gated_bwd, rmsnorm_gated_fwd
from kernels.ssd import triton_op as ssd
from kernels.ssd.reference import _check_shapes as check_ssd


def _forward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, dims, Q, dt_lo, dt_hi, eps, norm_before_gate,
             keep_states):
    """-> out (b, l, d_inner), xbc (the conv's output), y (the SSD's, (b, l, nheads, headdim)), rstd,
    and the SSD's cb, prev, final, dtp, cs (kernels/ssd/triton_op._forward)."""
    z, xBC, dt = split_packed(zxbcdt, dims)
    xbc = conv_forward(xBC, conv_w, conv_b, seq_idx, True)
    x, B, C = split_xbc(xbc, dims)
    y, final, _, cb, prev, dtp, cs = ssd._forward(x, dt, A, B, C, D, None, dt_bias, seq_idx, None, Q, True,
                                                  dt_lo, dt_hi, keep_states)
    out, rstd = rmsnorm_gated_fwd(y.view(z.shape), z, norm_w, dims.d_inner // dims.ngroups, eps, norm_before_gate)
    return out, xbc, y, rstd, cb, prev, final, dtp, cs


def _backward(dout, zxbcdt, xbc, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, y, rstd, cb, prev, final, dtp, cs,
              dims, Q, dt_lo, dt_hi, norm_before_gate):
    """-> d zxbcdt (one buffer: every kernel writes its column slice), d conv_w, d conv_b (None
    without), d dt_bias, dA, dD, d norm_w. xbc None: rerun the conv; cb and prev None: rerun the SSD's
    forward kernels that made them."""
    z, xBC, dt = split_packed(zxbcdt, dims)
    dzxbcdt = torch.empty_like(zxbcdt, memory_format=torch.contiguous_format)
    dz, dxBC, ddt = split_packed(dzxbcdt, dims)
    d_inner = dims.d_inner
    dy, _, dnorm_w = rmsnorm_gated_bwd(y.reshape(-1, d_inner), z.reshape(-1, d_inner), norm_w, rstd,
                                       _rows(dout, d_inner), d_inner // dims.ngroups, norm_before_gate,
                                       dz=dz.reshape(-1, d_inner))
    if xbc is None:
        xbc = conv_forward(xBC, conv_w, conv_b, seq_idx, True)
    x, B, C = split_xbc(xbc, dims)
    dxbc = torch.empty(xbc.shape, device=xbc.device, dtype=xbc.dtype)
    dx, dB, dC = split_xbc(dxbc, dims)
    _, _, dA, _, _, dD, _, ddt_bias, _ = ssd._backward(
        dy.view(y.shape), None, x, dt, A, B, C, D, None, dt_bias, seq_idx, None, cb, prev, final, dtp, cs, None,
        Q, True, dt_lo, dt_hi, out=(dx, dB, dC, ddt))
    del dy, xbc, x, B, C
    _, dconv_w, dconv_b = conv_backward(dxbc, xBC, conv_w, conv_b, seq_idx, True, dx=dxBC)
    return dzxbcdt, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w.to(norm_w.dtype)


# Custom ops: opaque to torch.compile, which traces the mixer around them (kernels/__init__.py).
# Absent optional outputs are empty tensors (an op returns tensors). Inputs may have any strides in
# the usual order (the packed projection is sliced anyway): no copy for a padded row stride.
_FWD_SCHEMA = ("(Tensor zxbcdt, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, Tensor A, Tensor D, Tensor norm_w, "
               "Tensor? seq_idx, int[] dims, int chunk_size, float dt_lo, float dt_hi, float eps, "
               "bool norm_before_gate, bool keep_conv, bool keep_states) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor zxbcdt, Tensor? xbc, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, Tensor A, "
               "Tensor D, Tensor norm_w, Tensor? seq_idx, Tensor y, Tensor rstd, Tensor? cb, Tensor? prev, "
               "Tensor final, Tensor dtp, Tensor cs, int[] dims, int chunk_size, float dt_lo, float dt_hi, "
               "bool norm_before_gate) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("hybrid_pretrain::mamba_inner_fwd", mutates_args=(), schema=_FWD_SCHEMA,
                         tags=ANY_STRIDES_IN_ORDER)
def _fwd_op(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, dims, chunk_size, dt_lo, dt_hi, eps,
            norm_before_gate, keep_conv, keep_states):
    out, xbc, *rest = _forward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, MambaDims(*dims), chunk_size,
                               dt_lo, dt_hi, eps, norm_before_gate, keep_states)
    return (out, xbc if keep_conv else zxbcdt.new_empty(0), *rest)


@_fwd_op.register_fake
def _(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, dims, chunk_size, dt_lo, dt_hi, eps, norm_before_gate,
      keep_conv, keep_states):
    dims = MambaDims(*dims)
    batch, seqlen, _ = zxbcdt.shape
    nchunks = cdiv(seqlen, chunk_size)
    h, p, g, n = dims
    f32 = torch.float32

    def new(*shape, dtype=None):
        return zxbcdt.new_empty(shape, dtype=dtype)

    return (new(batch, seqlen, dims.d_inner), new(batch, seqlen, dims.conv_dim) if keep_conv else new(0),
            new(batch, seqlen, h, p), new(batch * seqlen, g, dtype=f32),
            new(batch, nchunks, g, chunk_size, chunk_size, dtype=f32) if keep_states else new(0),
            new(batch, nchunks, h, p, n, dtype=f32) if keep_states else new(0), new(batch, h, p, n, dtype=f32),
            new(batch, h, nchunks, chunk_size, dtype=f32), new(batch, h, nchunks, chunk_size, dtype=f32))


@torch.library.custom_op("hybrid_pretrain::mamba_inner_bwd", mutates_args=(), schema=_BWD_SCHEMA,
                         tags=ANY_STRIDES_IN_ORDER)
def _bwd_op(dout, zxbcdt, xbc, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, y, rstd, cb, prev, final, dtp, cs,
            dims, chunk_size, dt_lo, dt_hi, norm_before_gate):
    grads = _backward(dout, zxbcdt, xbc, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, y, rstd, cb, prev, final,
                      dtp, cs, MambaDims(*dims), chunk_size, dt_lo, dt_hi, norm_before_gate)
    dzxbcdt, dconv_w, dconv_b, *small = grads
    # dconv_w as the conv's own backward op returns it (the transpose of a contiguous (width, dim))
    return (dzxbcdt, dconv_w, dconv_b if dconv_b is not None else zxbcdt.new_empty(0),
            *(g.contiguous() for g in small))


@_bwd_op.register_fake
def _(dout, zxbcdt, xbc, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, y, rstd, cb, prev, final, dtp, cs,
      dims, chunk_size, dt_lo, dt_hi, norm_before_gate):
    return (zxbcdt.new_empty(zxbcdt.shape), conv_w.new_empty(conv_w.shape[::-1]).t(),
            conv_b.new_empty(conv_b.shape) if conv_b is not None else zxbcdt.new_empty(0),
            dt_bias.new_empty(dt_bias.shape), A.new_empty(A.shape), D.new_empty(D.shape), norm_w.new_empty(norm_w.shape))


def _setup(ctx, inputs, output):
    (zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, dims, chunk_size, dt_lo, dt_hi, eps, norm_before_gate,
     keep_conv, keep_states) = inputs
    out, xbc, y, rstd, cb, prev, final, dtp, cs = output
    ctx.mark_non_differentiable(xbc, y, rstd, cb, prev, final, dtp, cs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(zxbcdt, xbc if keep_conv else None, conv_w, conv_b, dt_bias, A, D, norm_w, seq_idx, y, rstd,
                          cb if keep_states else None, prev if keep_states else None, final, dtp, cs)
    ctx.cfg = (list(dims), chunk_size, dt_lo, dt_hi, norm_before_gate)


def _grads(ctx, dout, *_not_differentiable):
    if dout is None:
        return (None,) * 16
    dzxbcdt, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w = _bwd_op(dout, *ctx.saved_tensors, *ctx.cfg)
    has_bias = ctx.saved_tensors[3] is not None
    return (dzxbcdt, dconv_w, dconv_b if has_bias else None, ddt_bias, dA, dD, dnorm_w, *(None,) * 9)


_mamba_inner_fwd = with_autograd(_fwd_op, _grads, _setup)


def mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, dims: MambaDims, chunk_size,
                dt_limit=(0.0, float("inf")), norm_eps=1e-5, norm_before_gate=False, seq_idx=None,
                recompute_conv=False, recompute_states=False, return_y=False):
    """Triton mixer core; same contract as kernels.mamba_inner.op.mamba_inner (hints and return_y there)."""
    dims = MambaDims(*(int(v) for v in dims))
    z, xBC, dt = split_packed(zxbcdt, dims)
    check_conv(xBC, conv_weight, conv_bias, "silu")
    x, B, C = split_xbc(xBC, dims)  # the conv output's shapes, for the SSD's checks
    check_ssd(x, dt, A, B, C, D, None, dt_bias, seq_idx, None)
    check_norm(z, z, norm_weight, dims.d_inner // dims.ngroups)
    Q = ssd.check_chunking(x.shape[0], x.shape[1], chunk_size)
    keep_states = not recompute_states and torch.is_grad_enabled()
    outputs = _mamba_inner_fwd(zxbcdt, conv_weight, conv_bias, dt_bias.contiguous(), A.contiguous(), D.contiguous(),
                               norm_weight.contiguous(), seq_idx, list(dims), Q, float(dt_limit[0]),
                               float(dt_limit[1]), float(norm_eps), bool(norm_before_gate), not recompute_conv,
                               keep_states)
    return (outputs[0], outputs[2].view(z.shape)) if return_y else outputs[0]


__all__ = ["mamba_inner"]
