"""Tensor-parallel dense MLP (also the shared expert): up/gate column-parallel, down row-parallel.

Same math and names as pretrain.layers.mlp.MLP. Input/output (seqlen[/tp with SP], batch, d_model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.common import column_linear, row_linear, split_part


class ParallelMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, *, mcfg):
        super().__init__()
        if activation not in ("relu2", "swiglu"):
            raise ValueError(f"unknown MLP activation {activation!r}; use relu2 or swiglu")
        self.activation = activation
        ff = split_part("", d_ff)
        self.up_proj = column_linear(mcfg, d_model, [ff], bias=bias)
        self.gate_proj = column_linear(mcfg, d_model, [ff], bias=bias) if activation == "swiglu" else None
        self.down_proj = row_linear(mcfg, [ff], d_model, bias=bias)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        up, _ = self.up_proj(x)
        if self.gate_proj is not None:
            h = F.silu(self.gate_proj(x)[0]) * up
        else:
            h = torch.square(F.relu(up))
        return self.down_proj(h)[0]
