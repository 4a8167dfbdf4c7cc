"""Triton SSD scan wired into autograd: a forward and a backward torch.library custom op (opaque to
torch.compile, kernels/__init__.py) joined by register_autograd (kernels/_autograd_op.py).

Owns `ssd_scan` for the Triton path: argument checks that only the Triton path needs (chunk
size a power of two >= 16), the forward (triton_fwd, triton_states) and backward (triton_bwd, triton_bwd_dx,
triton_bwd_scan) orchestration,
what the backward keeps (x, B, C, or with `conv_source` the conv's input, rerun in the backward;
the CB matrices and chunk states, or with `recompute_states` neither: the backward reruns the
forward kernels that made them, the same bits), and the SiLU gate backward (PyTorch elementwise;
the rest of the backward tail, from d(cumsum dA) to ddt, dA and d dt_bias, is the fused
triton_bwd_scan.dt_bwd kernel).
Shapes as in kernels.ssd.reference.
"""

from __future__ import annotations

import torch

from kernels._autograd_op import with_autograd
from kernels._triton_utils import MAX_GRID_YZ, cdiv, dot_precision
from kernels.ssd import triton_bwd as bwd
from kernels.ssd import triton_bwd_dx as bwd_dx
from kernels.ssd import triton_bwd_scan as bwd_scan
from kernels.ssd import triton_fwd as fwd
from kernels.ssd import triton_states as states
from kernels.ssd.reference import _check_shapes


def _xbc_from_conv(conv_x, conv_w, conv_b, seq_idx, silu, x_shape, bc_shape):
    """Rerun the conv forward and return x, B, C as the same views of its output as the mixer's."""
    from kernels.conv1d.triton_op import conv_forward

    xbc = conv_forward(conv_x, conv_w, conv_b, seq_idx, silu)
    d_inner, gn = x_shape[2] * x_shape[3], bc_shape[2] * bc_shape[3]
    x, B, C = torch.split(xbc, [d_inner, gn, gn], dim=-1)
    return x.reshape(x_shape), B.reshape(bc_shape), C.reshape(bc_shape)


def _forward(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_lo, dt_hi,
             keep_states):
    """The forward kernels: out, final, and what the backward needs: ypre (the ungated output, with z),
    cb and prev (with keep_states), dtp and cs. What is not kept is an empty tensor."""
    prec = dot_precision(x.dtype)
    dtp, cs = fwd.dt_cumsum(dt, dt_bias, A, chunk_size, dt_softplus, (dt_lo, dt_hi))
    cb = fwd.compute_cb(C, B, seq_idx, chunk_size, prec)
    # without keep_states the float32 prev is not written at all (bf16/fp16 x): the chunk scan reads prev_lp
    prev, prev_lp, final = states.states_and_pass(x, B, dtp, cs, seq_idx, initial_states, chunk_size, prec,
                                                  store_f32=keep_states)
    out, ypre = fwd.chunk_scan(cb, x, z, D, C, prev_lp, dtp, cs, seq_idx, chunk_size, z is not None, prec)
    # prev_lp is not kept: the dB/dC kernel rounds the float32 prev to the input dtype as it loads
    # it (the same bits as prev_lp), which saves a (batch, nchunks, nheads, headdim, dstate) tensor
    return (out, final, ypre if z is not None else x.new_empty(0), cb if keep_states else x.new_empty(0),
            prev if keep_states else x.new_empty(0), dtp, cs)


def _backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, final, dtp, cs, init,
              chunk_size, dt_softplus, dt_lo, dt_hi, out=None):
    """Every input gradient: dx, ddt, dA, dB, dC, dD, dz, ddt_bias (None where the input is), dinit.
    cb and prev None: rerun their forward kernels (the same bits). `out`, optional: (dx, dB, dC, ddt)
    tensors the kernels write those gradients into (the inputs' shapes and dtypes, any strides with a
    unit dstate stride, dB and dC with equal strides: column slices of one packed gradient,
    kernels.mamba_inner); they are returned."""
    dx_out, dB_out, dC_out, ddt_out = out if out is not None else (None,) * 4
    Q = chunk_size
    prec = dot_precision(x.dtype)
    if cb is None:
        cb = fwd.compute_cb(C, B, seq_idx, Q, prec)
        prev = states.states_and_pass(x, B, dtp, cs, seq_idx, init, Q, prec, store_lp=False)[0]
    dz = None
    if z is not None:
        zf = z.float()
        sig = torch.sigmoid(zf)
        doutf = dout.float()
        dz = (doutf * ypre.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = (doutf * zf * sig).to(x.dtype)
    else:
        dy = dout.to(x.dtype)
    dS, dS_lp, dinit, dcs_last = bwd_scan.dprev_and_pass_bwd(dy, C, cs, seq_idx, prev, final, dfinal, Q, prec)
    dx, ddtp, dcs, dD = bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq_idx, Q, prec, dx=dx_out)
    dB, dC, dcs_rows, dcs_offd = bwd.chunk_dcb_dbc(x, dy, B, C, prev, dS_lp, dtp, cs, seq_idx, cb, Q, prec,
                                                   out=(dB_out, dC_out) if out is not None else None)
    del dS, dS_lp
    ddt, dA, ddt_bias = bwd_scan.dt_bwd(dcs, dcs_rows, dcs_offd, dcs_last, ddtp, dtp, dt, dt_bias, A,
                                        dt_softplus, (dt_lo, dt_hi), ddt=ddt_out)
    dA = dA.to(A.dtype)
    ddt_bias = ddt_bias.to(dt_bias.dtype) if dt_bias is not None else None
    dD = dD.to(D.dtype) if dD is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit


# Custom ops: opaque to torch.compile, which traces the block around them (kernels/__init__.py).
# Absent optional outputs are empty tensors (an op returns tensors); every output is contiguous.
_FWD_SCHEMA = ("(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
               "Tensor? seq_idx, Tensor? initial_states, int chunk_size, bool dt_softplus, float dt_lo, float dt_hi, "
               "bool keep_states, Tensor? conv_x, Tensor? conv_w, Tensor? conv_b, bool conv_silu) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor? dfinal, Tensor? x, Tensor dt, Tensor A, Tensor? B, Tensor? C, Tensor? D, "
               "Tensor? z, Tensor? dt_bias, Tensor? seq_idx, Tensor? ypre, Tensor? cb, Tensor? prev, Tensor final, "
               "Tensor dtp, Tensor cs, Tensor? init, Tensor? conv_x, Tensor? conv_w, Tensor? conv_b, bool conv_silu, "
               "int[] x_shape, int[] bc_shape, int chunk_size, bool dt_softplus, float dt_lo, float dt_hi) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("hybrid_pretrain::ssd_scan_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd_op(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_lo, dt_hi,
            keep_states, conv_x, conv_w, conv_b, conv_silu):
    # conv_x, conv_w, conv_b, conv_silu (kernels.ssd conv_source): only for the backward to keep
    return _forward(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_lo, dt_hi,
                    keep_states)


@_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_lo, dt_hi, keep_states,
      conv_x, conv_w, conv_b, conv_silu):
    batch, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks = cdiv(seqlen, chunk_size)
    f32 = torch.float32
    return (x.new_empty(x.shape), x.new_empty(batch, nheads, hdim, dstate, dtype=f32),
            x.new_empty(x.shape) if z is not None else x.new_empty(0),
            x.new_empty(batch, nchunks, ngroups, chunk_size, chunk_size, dtype=f32) if keep_states else x.new_empty(0),
            x.new_empty(batch, nchunks, nheads, hdim, dstate, dtype=f32) if keep_states else x.new_empty(0),
            x.new_empty(batch, nheads, nchunks, chunk_size, dtype=f32),
            x.new_empty(batch, nheads, nchunks, chunk_size, dtype=f32))


@torch.library.custom_op("hybrid_pretrain::ssd_scan_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd_op(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, final, dtp, cs, init,
            conv_x, conv_w, conv_b, conv_silu, x_shape, bc_shape, chunk_size, dt_softplus, dt_lo, dt_hi):
    if conv_x is not None:  # x, B, C were slices of the conv's output: rerun it
        x, B, C = _xbc_from_conv(conv_x, conv_w, conv_b, seq_idx, conv_silu, x_shape, bc_shape)
    grads = _backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, final, dtp, cs, init,
                      chunk_size, dt_softplus, dt_lo, dt_hi)
    return tuple(g.contiguous() if g is not None else dt.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, final, dtp, cs, init,
      conv_x, conv_w, conv_b, conv_silu, x_shape, bc_shape, chunk_size, dt_softplus, dt_lo, dt_hi):
    def none():
        return dt.new_empty(0)

    xdtype = (x if x is not None else conv_x).dtype
    return (dt.new_empty(x_shape, dtype=xdtype), dt.new_empty(dt.shape), A.new_empty(A.shape),
            dt.new_empty(bc_shape, dtype=xdtype), dt.new_empty(bc_shape, dtype=xdtype),
            D.new_empty(D.shape) if D is not None else none(), z.new_empty(z.shape) if z is not None else none(),
            dt_bias.new_empty(dt_bias.shape) if dt_bias is not None else none(),
            final.new_empty(final.shape))


def _setup(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_lo, dt_hi,
     keep_states, conv_x, conv_w, conv_b, conv_silu) = inputs
    out, final, ypre, cb, prev, dtp, cs = output
    ctx.mark_non_differentiable(ypre, cb, prev, dtp, cs)
    ctx.set_materialize_grads(False)
    ctx.shapes = (list(x.shape), list(B.shape))
    if conv_x is not None:  # x, B, C are slices of the conv's output: keep its input, rerun it in backward
        x = B = C = None
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre if z is not None else None,
                          cb if keep_states else None, prev if keep_states else None, final, dtp, cs,
                          None if keep_states else initial_states, conv_x, conv_w, conv_b)
    ctx.cfg = (conv_silu, chunk_size, dt_softplus, dt_lo, dt_hi)
    ctx.has = (D is not None, z is not None, dt_bias is not None, initial_states is not None)


def _grads(ctx, dout, dfinal, *_not_differentiable):
    if dout is None and dfinal is None:
        return (None,) * 19
    x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, final, dtp, cs, init, conv_x, conv_w, conv_b = \
        ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(ctx.shapes[0], device=dt.device, dtype=(x if x is not None else conv_x).dtype)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = _bwd_op(
        dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre, cb, prev, final, dtp, cs, init,
        conv_x, conv_w, conv_b, ctx.cfg[0], *ctx.shapes, *ctx.cfg[1:])
    has_d, has_z, has_bias, has_init = ctx.has
    return (dx, ddt, dA, dB, dC, dD if has_d else None, dz if has_z else None, ddt_bias if has_bias else None, None,
            dinit if has_init else None, *(None,) * 9)


_ssd_fwd = with_autograd(_fwd_op, _grads, _setup)


def ssd_scan(
    x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), seq_idx=None, initial_states=None, return_final_states=False,
    conv_source=None, recompute_states=False,
):
    """Triton SSD scan; same contract as kernels.ssd.reference.ssd_scan (final states float32).
    With conv_source, x, B and C are not kept for the backward: it reruns the conv instead. With
    recompute_states, neither are the CB matrices and the float32 chunk states: it reruns their kernels
    (and for bf16/fp16 x the forward writes the chunk states only in x's dtype, for its own scan), as
    in no-grad mode, where there is no backward."""
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states)
    conv = _check_conv_source(conv_source, x, B)
    Q = check_chunking(x.shape[0], x.shape[1], chunk_size)
    if B.dtype != x.dtype or C.dtype != x.dtype:
        if conv_source is not None:
            raise ValueError("conv_source: x, B and C must be slices of one conv output (one dtype), got "
                             f"{x.dtype}, {B.dtype}, {C.dtype}")
        B, C = B.to(x.dtype), C.to(x.dtype)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    if initial_states is not None:
        initial_states = initial_states.float().contiguous()
    # nothing to keep for a backward that will not run (no grad mode: inference, the benchmark's forward)
    keep_states = not recompute_states and torch.is_grad_enabled()
    out, final = _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states, Q, bool(dt_softplus),
                         float(dt_limit[0]), float(dt_limit[1]), keep_states, *conv)[:2]
    return (out, final) if return_final_states else out


def check_chunking(batch, seqlen, chunk_size) -> int:
    """The chunk size as an int, after the Triton path's own limits: a power of two >= 16, and
    batch * nchunks programs within one CUDA grid axis."""
    Q = int(chunk_size)
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"the Triton SSD scan needs chunk_size a power of two >= 16, got {chunk_size}")
    nbc = batch * cdiv(seqlen, Q)
    if nbc > MAX_GRID_YZ:
        raise ValueError(f"the Triton SSD scan launches batch * ceil(seqlen / chunk_size) = {batch} * "
                         f"{cdiv(seqlen, Q)} = {nbc} programs along one CUDA grid axis, above its limit of "
                         f"{MAX_GRID_YZ}: use a larger chunk_size or fewer sequences per call")
    return Q


def _check_conv_source(conv_source, x, B):
    """conv_source (conv_x, weight, bias, activation) -> the autograd arguments (conv_x, weight, bias,
    silu), (None, None, None, False) without. Checks what can be checked, shapes and dtypes; that x,
    B and C really are the conv's output is the caller's contract."""
    if conv_source is None:
        return None, None, None, False
    conv_x, weight, bias, activation = conv_source
    batch, seqlen, nheads, hdim = x.shape
    width = nheads * hdim + 2 * B.shape[2] * B.shape[3]
    if conv_x.shape != (batch, seqlen, width) or weight.dim() != 2 or weight.shape[0] != width:
        raise ValueError(f"conv_source: conv input must be (batch, seqlen, d_inner + 2*ngroups*dstate)="
                         f"{(batch, seqlen, width)} with a ({width}, width) weight, got {tuple(conv_x.shape)} and "
                         f"{tuple(weight.shape)}")
    if conv_x.dtype != x.dtype:
        raise ValueError(f"conv_source: conv input dtype {conv_x.dtype} differs from x's {x.dtype}")
    if activation not in (None, "silu"):
        raise ValueError(f"conv_source: activation must be None or 'silu', got {activation!r}")
    return conv_x, weight, bias, activation == "silu"


__all__ = ["ssd_scan"]
