"""Pure-PyTorch causal depthwise conv1d: the spec for the Triton kernels.

Owns `causal_conv1d` (training/prefill) and `causal_conv1d_update` (one decoding step).

Shapes (channel-last, as the Mamba-2 mixer produces them):
  x (batch, seqlen, dim)   weight (dim, width), width 2..4   bias (dim,)
  seq_idx (batch, seqlen) int document index; a position never sees an earlier document
  out[b, t, d] = act(bias[d] + sum_k weight[d, k] * x[b, t - (width-1) + k, d])
(weight[:, -1] multiplies the current position; positions before 0 or in another document
count as zero). activation: None or "silu". Computation in float32 (float64 for float64 x),
output in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x, weight, bias, activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be (dim, width) with dim={x.shape[-1]}, got {tuple(weight.shape)}")
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"conv width must be 2..4, got {weight.shape[1]}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be (dim,), got {tuple(bias.shape)}")


def causal_conv1d(x, weight, bias=None, *, seq_idx=None, activation=None):
    """x (batch, seqlen, dim) -> (batch, seqlen, dim); see the module docstring."""
    _check(x, weight, bias, activation)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    xc = F.pad(x.to(cdt), (0, 0, width - 1, 0))  # (b, l + w - 1, d)
    w = weight.to(cdt)
    out = torch.zeros(batch, seqlen, dim, dtype=cdt, device=x.device) if bias is None else bias.to(cdt).expand(
        batch, seqlen, dim
    )
    if seq_idx is not None:
        si = F.pad(seq_idx.to(torch.int64), (width - 1, 0), value=-1)
    for k in range(width):
        shift = width - 1 - k  # input at t - shift
        term = xc[:, k : k + seqlen] * w[:, k]
        if seq_idx is not None and shift > 0:
            same = si[:, k : k + seqlen] == seq_idx.to(torch.int64)
            term = term * same[..., None].to(cdt)
        out = out + term
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation=None):
    """One decoding step. x (batch, dim); conv_state (batch, dim, width-1) holds the previous
    width-1 inputs (oldest first) and is updated in place; returns (batch, dim)."""
    _check(x[:, None], weight, bias, activation)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    width = weight.shape[1]
    if conv_state.shape != (x.shape[0], x.shape[1], width - 1):
        raise ValueError(f"conv_state must be (batch, dim, width-1), got {tuple(conv_state.shape)}")
    full = torch.cat([conv_state.to(cdt), x.to(cdt)[..., None]], dim=-1)  # (b, d, w)
    out = (full * weight.to(cdt)).sum(-1)
    if bias is not None:
        out = out + bias.to(cdt)
    if activation is not None:
        out = F.silu(out)
    conv_state.copy_(full[..., 1:].to(conv_state.dtype))
    return out.to(x.dtype)
