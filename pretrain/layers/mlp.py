"""Dense MLPs: squared-ReLU non-gated (Nemotron-H) and SwiGLU (Llama, Jamba), and the `mlp_act`
recomputation (trainer.recompute): the activation product act(gate, up) is not kept for the down
projection's backward but recomputed there from the gate and up outputs (which the activation's own
backward keeps anyway; pretrain.recompute.linear_of_recomputed), saving one (tokens, d_ff) tensor
per MLP at the cost of one elementwise pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.layers.linear import Linear
from pretrain.recompute import linear_of_recomputed


class MLP(nn.Module):
    """Input/output (..., d_model). relu2: down(relu(up(x))^2); swiglu: down(silu(gate(x)) * up(x))."""

    recompute_act = False  # set by pretrain.recompute.apply_policy (trainer.recompute includes mlp_act)

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False):
        super().__init__()
        if activation not in ("relu2", "swiglu"):
            raise ValueError(f"unknown MLP activation {activation!r}; use relu2 or swiglu")
        self.activation = activation
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.gate_proj = Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.down_proj = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute_act and torch.is_grad_enabled():
            gate = self.gate_proj(x) if self.gate_proj is not None else None
            return linear_of_recomputed(_act_with_vjp, (gate, self.up_proj(x)), self.down_proj)
        return mlp_forward(x, self.up_proj, self.gate_proj, self.down_proj)


def mlp_forward(x: torch.Tensor, up, gate, down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with a gate (swiglu), down(relu(up(x))^2) without (relu2); up, gate
    and down are callables (linears, tensor-parallel slices, grouped projections), gate may be None."""
    return down(_act(gate(x) if gate is not None else None, up(x)))


def _act(gate_out: torch.Tensor | None, up_out: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_out) * up_out if gate_out is not None else torch.square(F.relu(up_out))


def _act_with_vjp(gate_out: torch.Tensor | None, up_out: torch.Tensor, rerun: bool = False):
    """(_act(gate_out, up_out), vjp): vjp(d_act) -> (d_gate or None, d_up), the same aten ops autograd
    runs for _act's backward (the same bits), called directly: no torch.autograd.grad inside a
    backward, which torch.compile cannot trace (mlp_act's recomputation, linear_of_recomputed).
    rerun (the backward's recomputation): the product is formed with its operands swapped (x * x for
    the square): the same bits, but another node, so that a common-subexpression pass over the
    joint forward+backward graph that does not tell the two apart (torch 2.11's AOTAutograd) cannot
    merge the rerun into the forward's product and make the partitioner keep it, which is the
    tensor mlp_act exists not to keep (bench/NOTES_train.md, after Run 26)."""
    if gate_out is not None:
        silu = F.silu(gate_out)

        def vjp(d_act):
            return torch.ops.aten.silu_backward(d_act * up_out, gate_out), d_act * silu

        return (up_out * silu if rerun else silu * up_out), vjp
    relu = F.relu(up_out)

    def vjp(d_act):
        return None, torch.ops.aten.threshold_backward(d_act * (2.0 * relu), relu, 0)

    return (relu * relu if rerun else torch.square(relu)), vjp
