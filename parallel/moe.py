"""Tensor-parallel MoE MLP (ep = 1): every rank holds a d_ff slice of every expert.

Same routing rules, math and parameter names as the single-process reference
pretrain.layers.moe.MoE (`gate.weight`, `gate.expert_bias`, `experts.{j}.*`, `shared_experts.*`).
Per step of the forward, with T tokens on this rank ((seqlen[/tp], batch) flattened):
1. route the local tokens (the router is replicated; under sequence parallelism its gradient is
   partial over sequence shards and summed over tp, and the aux loss uses tp-global statistics);
2. under SP all-gather tokens, routes and gate weights over tp, so every rank sees the replica's tokens;
3. each expert runs its d_ff slice on its tokens (no communication per expert);
4. one all-reduce over tp of the stacked partial expert outputs, then gate weighting and combine;
5. under SP scatter back to this rank's sequence shard; add the (tensor-parallel) shared expert.
Expert parallelism (tokens dispatched by all-to-all over ep) is a later step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel import state
from parallel.common import LocalLinear, replicated_part, set_spec, split_part
from parallel.mlp import ParallelMLP
from pretrain.config import MoEConfig
from pretrain.layers.moe import TopKRouter


class ParallelTopKRouter(TopKRouter):
    """The reference router; its aux loss statistics are summed over sequence shards under SP."""

    def __init__(self, d_model: int, cfg: MoEConfig, sequence_parallel: bool):
        super().__init__(d_model, cfg)
        self.sequence_parallel = sequence_parallel
        set_spec(self.weight, 0, replicated_part("", cfg.num_experts), sequence_parallel=sequence_parallel)
        set_spec(self.expert_bias, 0, replicated_part("", cfg.num_experts))

    def forward(self, x: torch.Tensor):
        cfg = self.cfg
        if cfg.router == "sigmoid_bias" or not self.sequence_parallel:
            return super().forward(x)
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        dtype = torch.promote_types(x.dtype, torch.float32)
        probs = torch.softmax(F.linear(x.to(dtype), self.weight.to(dtype)), dim=-1)
        weights, indices = torch.topk(probs, cfg.top_k, dim=-1)
        counts = F.one_hot(indices, cfg.num_experts).sum(dim=(0, 1)).to(dtype)
        stats = torch.cat([counts, torch.tensor([float(x.shape[0])], dtype=dtype, device=x.device)])
        torch.distributed.all_reduce(stats, group=state.tp_group())
        counts, num_tokens = stats[:-1], stats[-1]
        prob_sum = reduce_from_tensor_model_parallel_region(probs.sum(dim=0))
        routed_share = counts / (num_tokens * cfg.top_k)
        aux = cfg.aux_loss_coeff * cfg.num_experts * (routed_share * prob_sum / num_tokens).sum()
        if cfg.norm_topk_prob and cfg.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * cfg.routed_scaling_factor, aux


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
        if self.gate_proj is not None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = torch.square(F.relu(self.up_proj(x)))
        return self.down_proj(h)


class ParallelMoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, shared_d_ff: int, *, mcfg):
        super().__init__()
        self.cfg = cfg
        self.sequence_parallel = bool(mcfg.sequence_parallel)
        self.gate = ParallelTopKRouter(d_model, cfg, self.sequence_parallel)
        self.experts = nn.ModuleList(ExpertSlice(d_model, cfg.d_ff, cfg.activation) for _ in range(cfg.num_experts))
        self.shared_experts = (ParallelMLP(d_model, shared_d_ff, cfg.activation, mcfg=mcfg)
                               if cfg.num_shared_experts else None)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp

        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        indices, weights, self.aux_loss = self.gate(x)
        with torch.no_grad():
            self.tokens_per_expert += torch.bincount(indices.flatten(), minlength=self.cfg.num_experts).float()
        tp = state.tp_size()
        if self.sequence_parallel:
            x = mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
            weights = mtp.gather_from_sequence_parallel_region(weights, tensor_parallel_output_grad=False)
            indices = mtp.gather_from_sequence_parallel_region(indices, tensor_parallel_output_grad=False)
        elif tp > 1:
            x = mtp.copy_to_tensor_model_parallel_region(x)
        token_ids, slots, partials = [], [], []
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(indices == e)
            if tok.numel() == 0:
                continue
            token_ids.append(tok)
            slots.append(slot)
            partials.append(expert(x[tok]))
        out = torch.zeros_like(x)
        if partials:
            token_ids, slots = torch.cat(token_ids), torch.cat(slots)
            y = torch.cat(partials)
            if tp > 1:
                y = mtp.reduce_from_tensor_model_parallel_region(y)
            y = y * weights[token_ids, slots, None].to(y.dtype)
            out = out.index_add(0, token_ids, y)
        if self.sequence_parallel:
            out = mtp.scatter_to_sequence_parallel_region(out)
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor:
        """The reference's bias update from the load summed over the sequence shards and dp replicas."""
        load = self.tokens_per_expert.clone()
        if torch.distributed.is_initialized():
            if self.sequence_parallel:
                torch.distributed.all_reduce(load, group=state.tp_group())
            if state.dp_size() > 1:
                torch.distributed.all_reduce(load, group=state.dp_group())
        if self.cfg.router == "sigmoid_bias" and load.sum() > 0:
            self.gate.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
        return load
