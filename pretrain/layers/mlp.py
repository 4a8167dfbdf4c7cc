"""Dense MLPs: squared-ReLU non-gated (Nemotron-H) and SwiGLU (Llama, Jamba)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Input/output (..., d_model). relu2: down(relu(up(x))^2); swiglu: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False):
        super().__init__()
        if activation not in ("relu2", "swiglu"):
            raise ValueError(f"unknown MLP activation {activation!r}; use relu2 or swiglu")
        self.activation = activation
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return mlp_forward(x, self.up_proj, self.gate_proj, self.down_proj)


def mlp_forward(x: torch.Tensor, up, gate, down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with a gate (swiglu), down(relu(up(x))^2) without (relu2); up, gate
    and down are callables (linears, tensor-parallel slices, grouped projections), gate may be None."""
    h = F.silu(gate(x)) * up(x) if gate is not None else torch.square(F.relu(up(x)))
    return down(h)
