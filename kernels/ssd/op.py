"""Public SSD scan entry point: dispatches to the Triton kernels or the PyTorch reference.

Same signature and shapes as kernels.ssd.reference.ssd_scan (see there):
x (batch, seqlen, nheads, headdim), dt (batch, seqlen, nheads), A (nheads,),
B/C (batch, seqlen, ngroups, dstate), states (batch, nheads, headdim, dstate).
seq_idx (batch, seqlen) int32, non-decreasing along each row (packed documents).
"""

from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.ssd import reference


def ssd_scan(
    x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), seq_idx=None, initial_states=None, return_final_states=False,
    conv_source=None, recompute_states=False,
):
    """conv_source (conv_x, weight, bias, activation), optional, a memory hint: x, B and C are the
    column slices [nheads*headdim | ngroups*dstate | ngroups*dstate] of
    causal_conv1d(conv_x, weight, bias, seq_idx=seq_idx, activation=activation) (kernels.conv1d).
    The Triton path then keeps conv_x (which the conv's backward keeps anyway) instead of x, B and C
    and reruns the conv forward in its backward; the results are the same. recompute_states, another
    memory hint: the Triton path keeps neither the (batch, nchunks, ngroups, Q, Q) CB matrices nor the
    float32 (batch, nchunks, nheads, headdim, dstate) chunk states, and reruns the forward kernels
    that make them in its backward; the same results. The reference ignores both."""
    kwargs = dict(
        chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        seq_idx=seq_idx, initial_states=initial_states, return_final_states=return_final_states,
    )
    if use_triton(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states) and _triton_dtype_ok(x):
        from kernels.ssd import triton_op

        return triton_op.ssd_scan(x, dt, A, B, C, **kwargs, conv_source=conv_source,
                                  recompute_states=recompute_states)
    return reference.ssd_scan(x, dt, A, B, C, **kwargs)
