"""Mixture-of-experts MLP, single-process reference: routers, token dispatch, shared expert, load stats.

Routers:
- sigmoid_bias (Nemotron-H / DeepSeek-V3): scores = sigmoid(router(x)); experts chosen by top-k of
  scores + expert_bias; gate weights are the chosen raw scores (normalised over the top-k when
  norm_topk_prob) x routed_scaling_factor. No auxiliary loss: after each optimizer step the bias
  moves by bias_update_rate x sign(mean load - load) (`update_expert_bias`).
- softmax_aux (Switch / Jamba): probs = softmax(router(x)); top-k of probs, gate weights the chosen
  probs (normalised when norm_topk_prob); load-balancing loss coeff x E x sum_i f_i P_i, with f_i the
  share of routed slots going to expert i and P_i the mean probability of expert i.

Dropless by default. With `capacity_factor` set, each expert takes at most
ceil(tokens x top_k / num_experts x capacity_factor) of a micro-batch's routed slots (per rank: the
tokens one forward sees), those with the largest gate weights; the other slots are dropped (they
add nothing to the output) and counted in `dropped_per_expert`. The load (`tokens_per_expert`)
counts routed slots, dropped or not.

Dispatch: the routed slots are sorted by expert and the experts run as one grouped computation
(pretrain/layers/grouped_mlp.py: torch's grouped GEMM on CUDA in bf16, no host synchronisation;
a loop elsewhere); each token's output is the gate-weighted sum over its k slots. Every expert runs
on every forward, also on zero tokens, so every expert weight is in the autograd graph (a zero
gradient): megatron's DDP waits for a gradient of every parameter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import MoEConfig
from pretrain.layers.grouped_mlp import grouped_mlp
from pretrain.layers.mlp import MLP
from pretrain.recompute import is_recomputing


def capacity_keep_mask(indices: torch.Tensor, weights: torch.Tensor, num_experts: int,
                       capacity_factor: float | None) -> torch.Tensor | None:
    """indices/weights (tokens, k) -> bool (tokens, k): the routed slots each expert keeps under its
    capacity ceil(tokens * k / num_experts * capacity_factor), largest gate weights first; None when dropless."""
    if capacity_factor is None:
        return None
    num_tokens = indices.shape[0]
    capacity = min(math.ceil(indices.numel() / num_experts * capacity_factor), num_tokens)
    scores = torch.full((num_tokens, num_experts), -math.inf, dtype=torch.float32, device=indices.device)
    scores.scatter_(1, indices, weights.detach().float())
    kept = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=indices.device)
    if capacity > 0:
        top = torch.topk(scores, capacity, dim=0, sorted=False).indices  # (capacity, experts)
        kept.scatter_(0, top, True)
    kept &= scores > -math.inf
    return kept.gather(1, indices)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (tokens, d_model) @ weight.T in at least float32, also under autocast (which would run the
    linear in bf16 and let near-ties flip the routing)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


class TopKRouter(nn.Module):
    """x (tokens, d_model) -> (indices (tokens, k) int64, weights (tokens, k) float32, aux loss scalar)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        # persistent: the bias is training state and goes into checkpoints and exports
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = router_logits(x, self.weight)
        if cfg.router == "sigmoid_bias":
            scores = torch.sigmoid(logits)
            _, indices = torch.topk(scores + self.expert_bias, cfg.top_k, dim=-1)
            weights = scores.gather(-1, indices)
            aux = logits.new_zeros(())
        else:
            probs = torch.softmax(logits, dim=-1)
            weights, indices = torch.topk(probs, cfg.top_k, dim=-1)
            counts = F.one_hot(indices, cfg.num_experts).sum(dim=(0, 1)).to(probs.dtype)
            num_tokens = x.shape[0]
            routed_share = counts / (num_tokens * cfg.top_k)
            aux = cfg.aux_loss_coeff * cfg.num_experts * (routed_share * probs.sum(dim=0) / num_tokens).sum()
        if cfg.norm_topk_prob and cfg.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * cfg.routed_scaling_factor, aux


def route_and_count(moe: "MoE", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Route the tokens x (tokens, d_model): sets the MoE's aux_loss, adds to its counts (not when the
    forward is recomputed), and returns (indices, weights, keep), keep being the capacity mask (None
    when dropless)."""
    indices, weights, moe.aux_loss = moe.gate(x)
    keep = capacity_keep_mask(indices, weights, moe.cfg.num_experts, moe.cfg.capacity_factor)
    if is_recomputing():  # the forward is rerun for the backward pass (trainer.recompute): counted already
        return indices, weights, keep
    with torch.no_grad():
        moe.tokens_per_expert += slots_per_expert(indices, moe.cfg.num_experts).float()
        if keep is not None:
            moe.dropped_per_expert += slots_per_expert(indices, moe.cfg.num_experts, ~keep).float()
    return indices, weights, keep


def slots_per_expert(indices: torch.Tensor, num_experts: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """indices (any shape) of experts -> int64 (num_experts,): how many of them (only those where
    `where`, a bool mask of the same shape) name each expert. A scatter-add into a fixed-size tensor,
    not torch.bincount, whose output size depends on the data (a graph break under torch.compile)
    and which has no deterministic CUDA kernel; integer sums are exact in any order."""
    flat = indices.reshape(-1)
    ones = torch.ones_like(flat) if where is None else where.reshape(-1).to(flat.dtype)
    return torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)


def sort_slots_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (tokens, k) -> (order, counts): the routed slots (flat, token-major) sorted by expert
    (stable), and the slots of each expert (num_experts,). Slot s belongs to token s // k."""
    return torch.argsort(indices.reshape(-1), stable=True), slots_per_expert(indices, num_experts)


def combine_slots(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """y (slots, d) in expert order -> (tokens, d): each token's gate-weighted sum over its k slots, in
    `dtype`. Slots dropped over capacity (keep False) add nothing. No atomics: deterministic."""
    num_tokens, top_k = weights.shape
    slots = torch.empty_like(y).index_copy(0, order, y).view(num_tokens, top_k, -1)
    gate = weights if keep is None else weights * keep
    return (slots.to(dtype) * gate.to(dtype)[..., None]).sum(dim=1)


class MoE(nn.Module):
    """Input/output (batch, seqlen, d_model). After forward: `aux_loss` (HybridLM.loss and forward take it
    off the layer: held here it would keep the forward's graph alive) and the running `tokens_per_expert`."""

    def __init__(self, d_model: int, cfg: MoEConfig, shared_d_ff: int):
        super().__init__()
        self.cfg = cfg
        self.gate = TopKRouter(d_model, cfg)
        self.experts = nn.ModuleList(MLP(d_model, cfg.d_ff, cfg.activation) for _ in range(cfg.num_experts))
        self.shared_experts = MLP(d_model, shared_d_ff, cfg.activation) if cfg.num_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("dropped_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        indices, weights, keep = route_and_count(self, x)
        order, counts = sort_slots_by_expert(indices, self.cfg.num_experts)
        y = grouped_mlp(x[order // indices.shape[1]], counts, list(self.experts), self.cfg.activation)
        out = combine_slots(y, order, weights, keep, x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor:
        """Apply the aux-loss-free bias update from the load counted since the last call; returns that load."""
        load = self.tokens_per_expert.clone()
        if self.cfg.router == "sigmoid_bias":  # no load: sign(0) moves nothing (no host sync to check)
            self.gate.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
        return load

    @torch.no_grad()
    def take_dropped_tokens(self) -> torch.Tensor:
        """Routed slots dropped over capacity per expert since the last call (zeros when dropless)."""
        dropped = self.dropped_per_expert.clone()
        self.dropped_per_expert.zero_()
        return dropped
