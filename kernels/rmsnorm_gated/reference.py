"""Pure-PyTorch grouped RMSNorm with a SiLU gate: the spec for the Triton kernels.

Owns `rmsnorm_gated` (Nemotron-H's MambaRMSNormGated).

Shapes: y, z (..., d); weight (d,); d % group_size == 0 (group_size = d_inner / ngroups).
  norm_before_gate=False (default):  out = rmsnorm_group(y * silu(z)) * weight
  norm_before_gate=True:             out = rmsnorm_group(y) * weight * silu(z)
  z=None:                            out = rmsnorm_group(y) * weight
rmsnorm_group(v) = v / sqrt(mean over each group of group_size channels of v^2 + eps).
Computation in float32 (float64 for float64 y); output in y's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(y, z, weight, group_size) -> None:
    """The shape contract shared by every implementation: y, z (..., d), weight (d,), d % group_size == 0."""
    d = y.shape[-1]
    if d % group_size != 0:
        raise ValueError(f"d ({d}) must be a multiple of group_size ({group_size})")
    if weight.shape != (d,):
        raise ValueError(f"weight must be ({d},), got {tuple(weight.shape)}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")


def rmsnorm_gated(y, z, weight, *, group_size, eps=1e-5, norm_before_gate=False):
    """See the module docstring."""
    check_args(y, z, weight, group_size)
    d = y.shape[-1]
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    v = y.to(cdt)
    if z is not None and not norm_before_gate:
        v = v * F.silu(z.to(cdt))
    g = v.reshape(*v.shape[:-1], d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    out = g.reshape(v.shape) * weight.to(cdt)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(cdt))
    return out.to(y.dtype)
