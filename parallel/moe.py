"""Tensor- and expert-parallel MoE MLP.

Same routing rules, math and parameter names as the single-process reference
pretrain.layers.moe.MoE (`gate.weight`, `gate.expert_bias`, `experts.{j}.*` with the global expert
index j, `shared_experts.*`). The router is replicated; every rank routes its own tokens (T =
(seqlen[/tp], batch) flattened), with the reference's capacity rule when a capacity factor is set.
Under sequence parallelism the router's gradient is partial over sequence shards (summed over tp);
the aux loss uses the statistics of the whole micro-batch under sequence and context parallelism.

ep = 1 (every rank holds a d_ff/tp slice of every expert): under SP all-gather tokens, routes and
gate weights over tp; the experts run grouped on the routed slots sorted by expert; one all-reduce
over tp of the partial outputs, gate weighting, combine; under SP scatter back to the shard.

ep > 1 (rank r of the ep group holds experts r*E/ep .. (r+1)*E/ep-1, each as a d_ff/tp slice):
megatron-core's MoEAlltoAllTokenDispatcher permutes the routed slots by expert, all-to-alls them to
the ranks holding their experts (all-gather over expert-tp when tp > 1, which then needs SP), the
local experts run grouped, outputs are weighted, reduce-scattered over expert-tp, sent back and
summed per token. Expert weights are replicated over the expert-data-parallel group only
(`allreduce=False`: megatron's DDP and distributed optimizer use the expert-dp groups for them).
Both: the (tensor-parallel) shared expert is added on the local tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import state
from parallel.common import replicated_part, set_spec
from parallel.experts import GroupedExperts
from parallel.mlp import ParallelMLP
from pretrain.config import MoEConfig
from pretrain.layers.moe import TopKRouter, combine_slots, route_and_count, sort_slots_by_expert


class ParallelTopKRouter(TopKRouter):
    """The reference router. When a replica's tokens are sharded (over tp under sequence parallelism,
    over cp), the softmax_aux balancing loss uses the whole micro-batch's statistics, as the single
    process does: expert counts and token counts are summed over the shards, and the probability sums
    too (forward all-reduce, backward identity, so each shard's gradient flows through its own
    tokens). Every shard then holds the whole aux loss; the model weights it by cp, as its
    cross-entropy, because megatron DDP averages gradients over cp (parallel.model.loss_from_logits)."""

    def __init__(self, d_model: int, cfg: MoEConfig, sequence_parallel: bool):
        super().__init__(d_model, cfg)
        self.sequence_parallel = sequence_parallel
        set_spec(self.weight, 0, replicated_part("", cfg.num_experts), sequence_parallel=sequence_parallel)
        set_spec(self.expert_bias, 0, replicated_part("", cfg.num_experts))

    def _token_shard_group(self):
        """The group over which this replica's tokens are split, or None when this rank has them all."""
        from megatron.core import parallel_state as ps

        sp, cp = self.sequence_parallel and state.tp_size() > 1, state.cp_size() > 1
        if sp and cp:
            return ps.get_tensor_and_context_parallel_group()
        return state.tp_group() if sp else state.cp_group() if cp else None

    def whole_batch_stats(self, counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens: torch.Tensor):
        group = self._token_shard_group()
        if group is None:
            return counts, prob_sum, num_tokens
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        stats = torch.cat([counts, num_tokens.reshape(1)])
        torch.distributed.all_reduce(stats, group=group)
        return stats[:-1], reduce_from_tensor_model_parallel_region(prob_sum, group=group), stats[-1]


class ParallelMoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, shared_d_ff: int, *, mcfg):
        super().__init__()
        self.cfg = cfg
        self.sequence_parallel = bool(mcfg.sequence_parallel)
        self.gate = ParallelTopKRouter(d_model, cfg, self.sequence_parallel)
        ep, per_rank = state.ep_size(), cfg.num_experts // state.ep_size()
        first = state.ep_rank() * per_rank
        self.experts = GroupedExperts(d_model, cfg.d_ff, cfg.activation, range(first, first + per_rank))
        self.shared_experts = (ParallelMLP(d_model, shared_d_ff, cfg.activation, mcfg=mcfg)
                               if cfg.num_shared_experts else None)
        self.dispatcher = _alltoall_dispatcher(cfg, mcfg, list(self.experts.expert_ids)) if ep > 1 else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("dropped_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        indices, weights, keep = route_and_count(self, x)
        if self.dispatcher is not None:
            out = self._forward_alltoall(x, indices, weights, keep)
        else:
            out = self._forward_local(x, indices, weights, keep)
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out

    def _forward_local(self, x, indices, weights, keep):
        """ep = 1: every rank runs its d_ff slice of every expert on the tp replica's tokens."""
        from megatron.core import tensor_parallel as mtp

        tp = state.tp_size()
        if self.sequence_parallel:
            x = mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
            weights = mtp.gather_from_sequence_parallel_region(weights, tensor_parallel_output_grad=False)
            indices = mtp.gather_from_sequence_parallel_region(indices, tensor_parallel_output_grad=False)
            if keep is not None:
                keep = mtp.gather_from_sequence_parallel_region(keep.to(torch.uint8),
                                                                tensor_parallel_output_grad=False).bool()
        elif tp > 1:
            x = mtp.copy_to_tensor_model_parallel_region(x)
        order, counts = sort_slots_by_expert(indices, self.cfg.num_experts)
        y = self.experts(x[order // indices.shape[1]], counts)
        if tp > 1:
            y = mtp.reduce_from_tensor_model_parallel_region(y)
        out = combine_slots(y, order, weights, keep, x.dtype)
        if self.sequence_parallel:
            out = mtp.scatter_to_sequence_parallel_region(out)
        return out

    def _forward_alltoall(self, x, indices, weights, keep):
        """ep > 1: megatron-core's all-to-all dispatcher sends each routed slot to the ep rank that
        holds its expert (and, with tp > 1, all-gathers the sequence shards over the expert-tp group),
        the local experts run grouped, and the outputs travel back the same way."""
        num_tokens, num_experts = x.shape[0], self.cfg.num_experts
        routed = indices if keep is None else torch.where(keep, indices, num_experts)  # dropped: a dummy column
        routing_map = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=x.device)
        routing_map.scatter_(1, routed, True)
        probs = torch.zeros(num_tokens, num_experts + 1, dtype=weights.dtype, device=x.device)
        probs = probs.scatter(1, routed, weights)
        routing_map, probs = routing_map[:, :num_experts].contiguous(), probs[:, :num_experts].contiguous()
        d = self.dispatcher
        tokens, slot_probs = d.dispatch_preprocess(x, routing_map, probs)
        tokens, slot_probs = d.token_dispatch(tokens, slot_probs)
        tokens, tokens_per_expert, slot_probs = d.dispatch_postprocess(tokens, slot_probs)
        y = self.experts(tokens, [int(n) for n in tokens_per_expert.tolist()])
        y = y * slot_probs[:, None].to(y.dtype)
        y = d.combine_preprocess(y)
        y = d.token_combine(y)
        return d.combine_postprocess(y)

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor:
        """The reference's bias update from the load summed over the sequence shards and dp replicas."""
        load = self._global(self.tokens_per_expert)
        if self.cfg.router == "sigmoid_bias" and load.sum() > 0:
            self.gate.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
        return load

    @torch.no_grad()
    def take_dropped_tokens(self) -> torch.Tensor:
        """Routed slots dropped over capacity per expert since the last call, summed over all ranks' tokens."""
        dropped = self._global(self.dropped_per_expert)
        self.dropped_per_expert.zero_()
        return dropped

    def _global(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.clone()
        if torch.distributed.is_initialized():
            if self.sequence_parallel:
                torch.distributed.all_reduce(counts, group=state.tp_group())
            if state.cp_size() > 1:  # each cp rank routed its own sequence shard
                torch.distributed.all_reduce(counts, group=state.cp_group())
            if state.dp_size() > 1:
                torch.distributed.all_reduce(counts, group=state.dp_group())
        return counts


def _alltoall_dispatcher(cfg: MoEConfig, mcfg, local_expert_ids: list[int]):
    """megatron-core's MoEAlltoAllTokenDispatcher over this rank's ep / expert-tp groups. Routing
    stays ours (the reference's routers, capacity rule and expert bias): the dispatcher gets the
    (tokens, experts) routing map and gate weights. With a capacity factor the map holds only the
    kept slots, and megatron sizes its buffers from the map (moe_expert_capacity_factor set)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if mcfg.num_moe_experts != cfg.num_experts or mcfg.moe_router_topk != cfg.top_k:
        raise ValueError("megatron's TransformerConfig lacks this MoE's sizes (parallel.common.megatron_config)")
    groups = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["ep", "expt_tp", "tp_ep"])
    return MoEAlltoAllTokenDispatcher(len(local_expert_ids), local_expert_ids, mcfg, pg_collection=groups)
