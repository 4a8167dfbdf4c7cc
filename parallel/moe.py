"""Tensor- and expert-parallel MoE MLP on megatron-core's TopKRouter and all-to-all token dispatcher.

Same routing rules, math and parameter names as the single-process reference
pretrain.layers.moe.MoE (`gate.weight`, `gate.expert_bias`, `experts.{j}.*` with the global expert
index j, `shared_experts.*`), which the tests compare it with.

Routing: megatron-core's `TopKRouter` (`MegatronRouter` below: sigmoid scores with expert-bias
selection, or softmax with its switch load-balancing loss; top-k, normalisation, scaling), run
dropless; with a capacity factor, megatron's `apply_router_token_dropping` then keeps each expert's
ceil(T*k/E*factor) slots of largest gate weight. The router is replicated; every rank routes its own
tokens T = (seqlen[/tp], batch). Its aux loss is attached to the gate weights by megatron's
`MoEAuxLossAutoScaler`, whose backward scale the engine sets (`set_aux_loss_scale`: the weight of
the micro-batch's loss, x cp as for the cross-entropy) and megatron's pipeline schedules set at pp > 1.
The statistics of that loss are summed over the ranks that hold the replica's other tokens (tp x cp
under sequence parallelism, else cp), as megatron's MoE layer does. The expert-bias update is
megatron's `get_updated_expert_bias` on the load this layer counts.

ep = 1 (every rank holds a d_ff/tp slice of every expert): under SP all-gather tokens, routes and
gate weights over tp; the experts run grouped on the routed slots sorted by expert; one all-reduce
over tp of the partial outputs, gate weighting, combine; under SP scatter back to the shard.

ep > 1 (rank r of the ep group holds experts r*E/ep .. (r+1)*E/ep-1, each as a d_ff/tp slice):
megatron-core's MoEAlltoAllTokenDispatcher permutes the kept slots by expert, all-to-alls them to
the ranks holding their experts (all-gather over expert-tp when tp > 1, which then needs SP), the
local experts run grouped, outputs are weighted, reduce-scattered over expert-tp, sent back and
summed per token. Expert weights are replicated over the expert-data-parallel group only
(`allreduce=False`: megatron's DDP and distributed optimizer use the expert-dp groups for them).
Both: the (tensor-parallel) shared expert is added on the local tokens.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.moe.router import TopKRouter
from torch import nn

from parallel import state
from parallel.common import megatron_moe_fields, replicated_part, set_spec
from parallel.experts import GroupedExperts
from parallel.mlp import ParallelMLP
from pretrain.config import MoEConfig
from pretrain.layers.moe import combine_slots, router_logits, sort_slots_by_expert
from pretrain.recompute import is_recomputing


def router_config(mcfg, cfg: MoEConfig):
    """megatron's TransformerConfig for the router: the model's, with our MoE settings in megatron's
    terms; routing is dropless here (a capacity factor is applied after it, by ParallelMoE)."""
    return dataclasses.replace(mcfg, **{**megatron_moe_fields(cfg), "moe_expert_capacity_factor": None})


class MegatronRouter(TopKRouter):
    """megatron-core's TopKRouter: (seqlen, batch, d_model) -> (probs, routing_map), both (tokens,
    num_experts): gate weights (zero where not routed, the aux loss attached) and the chosen experts.

    Overrides, each for a measured reason:
    - `gating`: the router linear via pretrain.layers.moe.router_logits (float32, also under
      autocast). megatron-core 0.16.1's own names `te_general_gemm`, which is undefined without
      TransformerEngine, and moves a CPU weight to CUDA.
    - `_apply_expert_bias`: counts nothing. Megatron counts the load whenever gradients are enabled,
      so twice for a forward that torch.utils.checkpoint reruns (trainer.recompute); ParallelMoE
      counts it once and feeds megatron's `get_updated_expert_bias`.
    - `expert_bias` exists for the softmax router too (zeros, unused), as in the single-process
      build, so both builds write the same checkpoint keys.
    """

    def __init__(self, mcfg, cfg: MoEConfig, token_shard_group):
        from megatron.core.process_groups_config import ProcessGroupCollection

        groups = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp", "tp_dp_cp"])
        # megatron sums the balancing statistics over tp_cp; without sequence parallelism every tp rank
        # holds the same tokens, so only the cp shards differ
        groups.tp_cp = token_shard_group
        super().__init__(router_config(mcfg, cfg), pg_collection=groups)
        if self.expert_bias is None:  # megatron sets a plain attribute
            del self.expert_bias
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        set_spec(self.weight, 0, replicated_part("", cfg.num_experts), sequence_parallel=mcfg.sequence_parallel)
        set_spec(self.expert_bias, 0, replicated_part("", cfg.num_experts))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return router_logits(input, self.weight)

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None) -> None:
        pass


def set_aux_loss_scale(scale: float, device: torch.device) -> None:
    """The gradient megatron's MoEAuxLossAutoScaler sends into every MoE aux loss of the next backward
    pass: the weight the micro-batch's loss gets (1/micro-batches, x cp, see parallel.model.loss_from_logits)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # shape (1,), as megatron's schedules set it (set_loss_scale copies into the first tensor it got);
    # torch.full fills on the device (torch.tensor([scale], device=...) would copy from the host and,
    # from pageable memory, wait for the GPU's queued work)
    MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), float(scale), device=device))


class ParallelMoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, shared_d_ff: int, *, mcfg):
        super().__init__()
        self.cfg = cfg
        self.sequence_parallel = bool(mcfg.sequence_parallel)
        self.gate = MegatronRouter(mcfg, cfg, self._token_shard_group())
        ep, per_rank = state.ep_size(), cfg.num_experts // state.ep_size()
        first = state.ep_rank() * per_rank
        self.experts = GroupedExperts(d_model, cfg.d_ff, cfg.activation, range(first, first + per_rank))
        self.shared_experts = (ParallelMLP(d_model, shared_d_ff, cfg.activation, mcfg=mcfg)
                               if cfg.num_shared_experts else None)
        self.dispatcher = _alltoall_dispatcher(cfg, mcfg, list(self.experts.expert_ids)) if ep > 1 else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("dropped_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)

    def _token_shard_group(self):
        """The group over which a replica's tokens are split: tp x cp under sequence parallelism, else
        cp (a group of one rank when cp = 1)."""
        from megatron.core import parallel_state as ps

        if self.sequence_parallel and state.tp_size() > 1:
            return ps.get_tensor_and_context_parallel_group()
        return state.cp_group()

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (seqlen[/tp], batch, d_model) -> the same shape."""
        from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

        shape = hidden.shape
        probs, routing_map = self.gate(hidden)
        kept_probs, kept_map = probs, routing_map
        if self.cfg.capacity_factor is not None:
            kept_probs, kept_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.cfg.top_k, capacity_factor=self.cfg.capacity_factor)
        self._count(routing_map, kept_map)
        x = hidden.reshape(-1, shape[-1])
        if self.dispatcher is not None:
            out = self._forward_alltoall(x, kept_probs, kept_map)
        else:
            out = self._forward_local(x, routing_map, kept_probs)
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out

    @torch.no_grad()
    def _count(self, routing_map: torch.Tensor, kept_map: torch.Tensor) -> None:
        """Routed slots per expert (dropped or not) and dropped slots, once per forward (not again
        when the forward is recomputed for the backward pass)."""
        if is_recomputing():
            return
        self.tokens_per_expert += routing_map.sum(dim=0)
        if kept_map is not routing_map:
            self.dropped_per_expert += (routing_map & ~kept_map).sum(dim=0)

    def _forward_local(self, x, routing_map, kept_probs):
        """ep = 1: every rank runs its d_ff slice of every expert on the tp replica's tokens. The k
        chosen experts of each token are taken from the routing map (exactly k per token, dropless);
        slots dropped over capacity run with gate weight 0."""
        from megatron.core import tensor_parallel as mtp

        indices = torch.topk(routing_map.to(torch.int8), self.cfg.top_k, dim=1, sorted=False).indices
        weights = kept_probs.gather(1, indices)
        tp = state.tp_size()
        if self.sequence_parallel:
            x = mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
            weights = mtp.gather_from_sequence_parallel_region(weights, tensor_parallel_output_grad=False)
            indices = mtp.gather_from_sequence_parallel_region(indices, tensor_parallel_output_grad=False)
        elif tp > 1:
            x = mtp.copy_to_tensor_model_parallel_region(x)
        order, counts = sort_slots_by_expert(indices, self.cfg.num_experts)
        y = self.experts(x[order // indices.shape[1]], counts)
        if tp > 1:
            y = mtp.reduce_from_tensor_model_parallel_region(y)
        out = combine_slots(y, order, weights, None, x.dtype)
        if self.sequence_parallel:
            out = mtp.scatter_to_sequence_parallel_region(out)
        return out

    def _forward_alltoall(self, x, probs, routing_map):
        """ep > 1: megatron-core's all-to-all dispatcher sends each kept slot to the ep rank that holds
        its expert (and, with tp > 1, all-gathers the sequence shards over the expert-tp group), the
        local experts run grouped, and the outputs travel back the same way."""
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
        """The load since the last call (routed slots per expert, dropped or not, over the sequence
        shards and dp replicas); for the sigmoid router, megatron's expert-bias update from it."""
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        load = self._global(self.tokens_per_expert)
        if self.cfg.router == "sigmoid_bias":  # no load anywhere: sign(0) moves nothing
            # megatron sums this rank's count over tp x dp x cp itself (x tp without sequence
            # parallelism, which the sign of (mean - load) does not see)
            self.gate.expert_bias.copy_(get_updated_expert_bias(
                self.tokens_per_expert.clone(), self.gate.expert_bias, self.cfg.bias_update_rate))
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
    """megatron-core's MoEAlltoAllTokenDispatcher over this rank's ep / expert-tp groups. It gets the
    (tokens, experts) routing map and gate weights of the kept slots; with a capacity factor
    megatron sizes its buffers from the map (moe_expert_capacity_factor set)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if mcfg.num_moe_experts != cfg.num_experts or mcfg.moe_router_topk != cfg.top_k:
        raise ValueError("megatron's TransformerConfig lacks this MoE's sizes (parallel.common.megatron_config)")
    groups = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["ep", "expt_tp", "tp_ep"])
    return MoEAlltoAllTokenDispatcher(len(local_expert_ids), local_expert_ids, mcfg, pg_collection=groups)
