"""Public entry points of the Mamba-2 mixer core between in_proj and out_proj (kernels.mamba_inner).

`mamba_inner`: the whole core, same signature and shapes as kernels.mamba_inner.reference (see
there), plus two memory hints. On the Triton path it is one fused autograd node
(kernels/mamba_inner/triton_op.py) whose backward writes the packed projection's gradient into one
buffer; elsewhere it is the reference.
"""
from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.mamba_inner import reference
from kernels.mamba_inner.reference import MambaDims, split_packed, split_xbc  # noqa: F401  (re-exported)


def mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, dims: MambaDims, chunk_size,
                dt_limit=(0.0, float("inf")), norm_eps=1e-5, norm_before_gate=False, seq_idx=None,
                recompute_conv=False, recompute_states=False, return_y=False):
    """recompute_conv: keep the conv's input, not its output, and rerun the conv in the backward;
    recompute_states: keep neither the SSD's CB matrices nor its chunk states, rerun their kernels
    (kernels.ssd's conv_source and recompute_states; the same results). The reference ignores both.
    return_y: -> (out, y), y (batch, seqlen, d_inner) the SSD's output before the gated norm, which
    the backward keeps anyway, without autograd history (out's gradient reaches every input through
    out): for a caller that reruns the norm instead of keeping out (the mixer's mamba_norm)."""
    if use_triton(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx) and _triton_dtype_ok(zxbcdt):
        from kernels.mamba_inner import triton_op

        return triton_op.mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, dims=dims,
                                     chunk_size=chunk_size, dt_limit=dt_limit, norm_eps=norm_eps,
                                     norm_before_gate=norm_before_gate, seq_idx=seq_idx,
                                     recompute_conv=recompute_conv, recompute_states=recompute_states,
                                     return_y=return_y)
    return reference.mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, dims=dims,
                                 chunk_size=chunk_size, dt_limit=dt_limit, norm_eps=norm_eps,
                                 norm_before_gate=norm_before_gate, seq_idx=seq_idx, return_y=return_y)
