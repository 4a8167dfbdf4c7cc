"""Public entry points of the Mamba-2 mixer core between in_proj and out_proj (kernels.mamba_inner).

`mamba_inner`: the whole core, same signature and shapes as kernels.mamba_inner.reference (see
there), plus two memory hints. On the Triton path it is one fused autograd node
(kernels/mamba_inner/triton_op.py) whose backward writes the packed projection's gradient into one
buffer; elsewhere it is the reference.
`split_conv_scan`: the core without its gated norm, through the separate dispatching ops, for a
caller that runs the norm itself (the mixer's mamba_norm recomputation reruns it inside out_proj's
backward); autograd then joins the gradients of the packed projection's slices with a cat.
"""
from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.conv1d.op import causal_conv1d
from kernels.mamba_inner import reference
from kernels.mamba_inner.reference import MambaDims, split_packed, split_xbc
from kernels.ssd.op import ssd_scan


def mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, dims: MambaDims, chunk_size,
                dt_limit=(0.0, float("inf")), norm_eps=1e-5, norm_before_gate=False, seq_idx=None,
                recompute_conv=False, recompute_states=False):
    """recompute_conv: keep the conv's input, not its output, and rerun the conv in the backward;
    recompute_states: keep neither the SSD's CB matrices nor its chunk states, rerun their kernels
    (kernels.ssd's conv_source and recompute_states; the same results). The reference ignores both."""
    if use_triton(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx) and _triton_dtype_ok(zxbcdt):
        from kernels.mamba_inner import triton_op

        return triton_op.mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, dims=dims,
                                     chunk_size=chunk_size, dt_limit=dt_limit, norm_eps=norm_eps,
                                     norm_before_gate=norm_before_gate, seq_idx=seq_idx,
                                     recompute_conv=recompute_conv, recompute_states=recompute_states)
    return reference.mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, dims=dims,
                                 chunk_size=chunk_size, dt_limit=dt_limit, norm_eps=norm_eps,
                                 norm_before_gate=norm_before_gate, seq_idx=seq_idx)


def split_conv_scan(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, *, dims: MambaDims, chunk_size,
                    dt_limit=(0.0, float("inf")), seq_idx=None, recompute_conv=False, recompute_states=False):
    """-> (y, z), both (batch, seqlen, d_inner): the SSD's output before the gated norm and z (a view
    of zxbcdt). Hints as in mamba_inner."""
    z, xBC, dt = split_packed(zxbcdt, dims)
    conv_source = (xBC, conv_weight, conv_bias, "silu") if recompute_conv else None
    xbc = causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
    x, B, C = split_xbc(xbc, dims)
    y = ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit,
                 seq_idx=seq_idx, conv_source=conv_source, recompute_states=recompute_states)
    return y.reshape(z.shape), z
