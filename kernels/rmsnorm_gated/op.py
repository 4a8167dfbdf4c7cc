"""Public gated grouped RMSNorm entry point: dispatches to Triton or the PyTorch reference.

Same signature and shapes as kernels.rmsnorm_gated.reference.rmsnorm_gated (see there):
y, z (..., d); weight (d,); group_size divides d.
"""

from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.rmsnorm_gated import reference


def rmsnorm_gated(y, z, weight, *, group_size, eps=1e-5, norm_before_gate=False):
    if use_triton(y, z, weight) and _triton_dtype_ok(y):
        from kernels.rmsnorm_gated import triton_op

        return triton_op.rmsnorm_gated(y, z, weight, group_size=group_size, eps=eps,
                                       norm_before_gate=norm_before_gate)
    return reference.rmsnorm_gated(y, z, weight, group_size=group_size, eps=eps, norm_before_gate=norm_before_gate)
