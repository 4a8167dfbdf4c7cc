"""The experts of an MoE run together over one token matrix sorted by expert.

    grouped_mlp(x, counts, experts, activation) -> y
        x (tokens, d_model) sorted by expert; counts (experts,) tokens per expert, in that order (an
        int tensor, or a list); experts: modules with up_proj / gate_proj (swiglu) / down_proj whose
        `.weight` is (out, in), as pretrain.layers.mlp.MLP; y (tokens, d_model), row i the output of
        the expert that row i of x belongs to.

Backends: torch._grouped_mm on CUDA in bf16 (the input is bf16, or bf16 autocast is on): one
kernel per projection for all experts, no host synchronisation; a loop of plain matmuls over
x.split(counts) everywhere else (CPU, float32, biases, dimensions not a multiple of 8, which the
grouped GEMM's 16-byte strides need). Every expert runs, also on zero tokens, so every expert
weight joins the autograd graph.
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.layers.mlp import mlp_forward


def grouped_mm_dtype(x: torch.Tensor, experts: list[nn.Module] | None = None) -> torch.dtype | None:
    """bfloat16 when torch's grouped GEMM can run these experts on x, else None."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return None
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    if not bf16:
        return None
    for expert in experts or []:
        for lin in (expert.up_proj, expert.gate_proj, expert.down_proj):
            if lin is not None and (getattr(lin, "bias", None) is not None or any(n % 8 for n in lin.weight.shape)):
                return None
    return torch.bfloat16


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor | list[int], experts: list[nn.Module],
                activation: str) -> torch.Tensor:
    if len(counts) != len(experts):
        raise ValueError(f"{len(counts)} token counts for {len(experts)} experts")
    dtype = grouped_mm_dtype(x, experts)
    if dtype is None or x.shape[0] == 0:
        sizes = counts.tolist() if torch.is_tensor(counts) else list(counts)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"counts {sizes} do not split {x.shape[0]} tokens over {len(experts)} experts")
        return torch.cat([expert(piece) for expert, piece in zip(experts, x.split(sizes))])
    offs = torch.as_tensor(counts, device=x.device).cumsum(0).to(torch.int32)

    def projection(name: str):
        # stacked first, then cast once: two kernels (and autograd nodes) per projection, not 2 x experts
        w = torch.stack([getattr(e, name).weight for e in experts]).to(dtype).transpose(1, 2)  # (experts, in, out)
        # the input is cast too: autocast may hand back float32 (torch.square is a float32 op under it)
        return lambda inp: torch._grouped_mm(inp.to(dtype), w, offs=offs)

    gate = projection("gate_proj") if activation == "swiglu" else None
    return mlp_forward(x, projection("up_proj"), gate, projection("down_proj"))
