"""Public causal conv1d entry points: dispatch to the Triton kernels or the PyTorch reference.

Same signatures and shapes as kernels.conv1d.reference (see there): x (batch, seqlen, dim),
weight (dim, width), bias (dim,), seq_idx (batch, seqlen); update: x (batch, dim),
conv_state (batch, dim, width-1) updated in place.
"""

from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.conv1d import reference


def causal_conv1d(x, weight, bias=None, *, seq_idx=None, activation=None):
    if use_triton(x, weight, bias, seq_idx) and _triton_dtype_ok(x):
        from kernels.conv1d import triton_op

        return triton_op.causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)
    return reference.causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation=None):
    # decoding step: tiny and latency bound; the reference is used on every backend
    return reference.causal_conv1d_update(x, conv_state, weight, bias, activation=activation)
