"""This rank's routed experts, run as one grouped computation over tokens sorted by expert.

Each expert is an `ExpertSlice` (the d_ff/tp slice of one pretrain.layers.mlp.MLP, same names),
held in a ModuleDict keyed by the *global* expert index, so parameter and checkpoint names are
`experts.{j}.up_proj.weight` at any ep (rank r of ep holds experts r*E/ep .. (r+1)*E/ep - 1).

`GroupedExperts(x, counts)`: x (tokens, d_model) sorted by local expert, counts[i] tokens for the
i-th local expert -> (tokens, d_model), this rank's partial sum over its d_ff slice. Every local
expert runs on every call, also on zero tokens, so every expert weight is in the autograd graph
(megatron's DDP with overlapped reduction waits for a gradient of every parameter; an expert that
got no tokens gets a zero gradient instead of hanging or failing the bucket).
Backends: pretrain.layers.grouped_mlp (torch._grouped_mm on CUDA in bf16, a loop of plain matmuls
elsewhere; empty experts are empty matmuls).
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import state
from parallel.common import LocalLinear, set_spec, split_part
from pretrain.layers.grouped_mlp import grouped_mlp
from pretrain.layers.mlp import mlp_forward


class ExpertSlice(nn.Module):
    """One expert's d_ff slice: up (and gate) rows, down columns; names as pretrain.layers.mlp.MLP."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        local = d_ff // state.tp_size()
        self.up_proj = LocalLinear(d_model, local)
        self.gate_proj = LocalLinear(d_model, local) if activation == "swiglu" else None
        self.down_proj = LocalLinear(local, d_model)
        ff = split_part("", d_ff)
        for lin in (self.up_proj, self.gate_proj):
            if lin is not None:
                set_spec(lin.weight, 0, ff)
        set_spec(self.down_proj.weight, 1, ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, d_model) -> this rank's partial sum of the expert output (tokens, d_model)."""
        return mlp_forward(x, self.up_proj, self.gate_proj, self.down_proj)


class GroupedExperts(nn.ModuleDict):
    def __init__(self, d_model: int, d_ff: int, activation: str, expert_ids: range):
        super().__init__({str(j): ExpertSlice(d_model, d_ff, activation) for j in expert_ids})
        self.expert_ids = expert_ids
        self.activation = activation
        for p in self.parameters():
            p._hp_expert = True  # type: ignore[attr-defined]  # replicated over expert-dp only (checkpoint replica ids)
            # megatron DDP / optimizer: reduced over the expert-data-parallel group, in their own
            # buffers and chained optimizer; at ep=1 too, so the optimizer's layout (and its
            # checkpoint) is the same at any ep
            p.allreduce = False  # type: ignore[attr-defined]

    def __getitem__(self, key):  # experts[j] by global index, as the single-process ModuleList
        return super().__getitem__(str(key))

    def local(self) -> list[ExpertSlice]:
        return [super(GroupedExperts, self).__getitem__(str(j)) for j in self.expert_ids]

    def forward(self, x: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        return grouped_mlp(x, counts, self.local(), self.activation)
