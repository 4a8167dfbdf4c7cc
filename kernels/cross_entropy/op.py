"""Public row-wise cross-entropy entry point: dispatches to the Triton kernel or the PyTorch reference.

Same signature and shapes as kernels.cross_entropy.reference.cross_entropy_rows (see there): logits
(n, vocab), target (n,), row_scale (n,) -> lse (n,), target_logit (n,); the gradient replaces logits.
"""
from __future__ import annotations

from kernels.backend import triton_dtype_ok as _triton_dtype_ok
from kernels.backend import use_triton
from kernels.cross_entropy import reference


def cross_entropy_rows(logits, target, row_scale, z_loss_coeff=0.0, want_grad=True):
    if use_triton(logits, target, row_scale) and _triton_dtype_ok(logits):
        from kernels.cross_entropy import triton_op

        return triton_op.cross_entropy_rows(logits, target, row_scale, z_loss_coeff, want_grad)
    return reference.cross_entropy_rows(logits, target, row_scale, z_loss_coeff, want_grad)
