"""Public gated grouped RMSNorm entry point: dispatches to Triton or the PyTorch reference.

Same signature and shapes as kernels.rmsnorm_gated.reference.rmsnorm_gated (see there):
y, z (..., d); weight (d,); group_size divides d.
"""

from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.rmsnorm_gated import reference


def runs_triton(y, z, weight) -> bool:
    """Whether rmsnorm_gated on these tensors takes the Triton path."""
    return use_triton(y, z, weight) and _triton_dtype_ok(y)


def rmsnorm_gated(y, z, weight, *, group_size, eps=1e-5, norm_before_gate=False):
    if runs_triton(y, z, weight):
        from kernels.rmsnorm_gated import triton_op

        return triton_op.rmsnorm_gated(y, z, weight, group_size=group_size, eps=eps,
                                       norm_before_gate=norm_before_gate)
    return reference.rmsnorm_gated(y, z, weight, group_size=group_size, eps=eps, norm_before_gate=norm_before_gate)


def rmsnorm_gated_with_vjp(y, z, weight, *, group_size, eps=1e-5, norm_before_gate=False):
    """(rmsnorm_gated(y, z, weight, ...), vjp) where vjp(dout) -> (dy, dz or None, dweight), from the
    Triton kernels directly, recording no autograd graph: the Triton path only (runs_triton), for
    recomputation inside a backward (pretrain.recompute.linear_of_recomputed's fn_with_vjp)."""
    from kernels.rmsnorm_gated import triton_op

    return triton_op.rmsnorm_gated_with_vjp(y, z, weight, group_size=group_size, eps=eps,
                                            norm_before_gate=norm_before_gate)
