"""Pipeline parallelism (`parallel.pp`, optional `parallel.virtual_pp`) with megatron-core's schedules.

Stages: the layer pattern is cut into pp x virtual_pp virtual stages, at its `|` boundaries when it
has any (consecutive `|`-separated segments are grouped, their number must be a multiple of the
number of virtual stages), else evenly by layer count (pretrain.config.validate says which is
impossible). Megatron's interleaved assignment: model chunk j of pipeline rank r is virtual stage
j x pp + r. The embedding lives on virtual stage 0, the final norm, head and loss on the last one.

Each chunk is a `ParallelHybridLM` holding only its layers, under their global names
(`layers.7.mixer...`, an nn.ModuleDict keyed by the global index), so state-dict and checkpoint keys
do not depend on pp. Chunks take the residual stream (seqlen[/cp][/tp], batch, d_model) from the
previous stage through megatron's `set_input_tensor`; every stage reads the micro-batch from its
data iterator (seq_idx for the mixers; tokens on the first stage, labels on the last).

One optimizer step's micro-batches go through `megatron.core.pipeline_parallel.get_forward_backward_func()`
(1F1B; interleaved 1F1B with virtual_pp). The loss is the mean over micro-batches of each micro-batch's
token mean, as at pp=1. MoE aux losses (softmax_aux router) on every stage enter the backward through
megatron's MoEAuxLossAutoScaler, scaled like the loss (cp / num_microbatches; parallel.moe).

Tied embeddings: the last stage holds a copy of the embedding as its head (same name, marked
`shared` for megatron's grad norm and as a pp replica in checkpoints); before the dp reduction the
two local gradients are summed over megatron's embedding group, so both copies take the same steps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel import state
from pretrain.distributed import collective_device


def virtual_stage_layers(stage_layer_counts: tuple[int, ...], num_virtual_stages: int) -> list[range]:
    """Global layer indices of each virtual stage (index = chunk x pp + pp rank).

    stage_layer_counts: layers per `|`-separated segment (one segment when the pattern has no `|`).
    With one segment the layers are split evenly; otherwise consecutive segments are grouped."""
    total = sum(stage_layer_counts)
    if len(stage_layer_counts) == 1:
        if total % num_virtual_stages:
            raise ValueError(f"{total} layers do not split evenly into {num_virtual_stages} stages")
        size = total // num_virtual_stages
        return [range(i * size, (i + 1) * size) for i in range(num_virtual_stages)]
    if len(stage_layer_counts) % num_virtual_stages:
        raise ValueError(f"{len(stage_layer_counts)} segments do not group into {num_virtual_stages} stages")
    per = len(stage_layer_counts) // num_virtual_stages
    out, start = [], 0
    for i in range(num_virtual_stages):
        n = sum(stage_layer_counts[i * per:(i + 1) * per])
        out.append(range(start, start + n))
        start += n
    return out


def num_chunks() -> int:
    return state.config().parallel.virtual_pp or 1


def chunk_placements(derived) -> list[tuple[range, bool, bool]]:
    """(layers, pre_process, post_process) of this pipeline rank's model chunks, in chunk order."""
    pp, vpp = state.pp_size(), num_chunks()
    ranges = virtual_stage_layers(derived.stage_layer_counts, pp * vpp)
    out = []
    for j in range(vpp):
        v = j * pp + state.pp_rank()
        out.append((ranges[v], v == 0, v == pp * vpp - 1))
    return out


class ModelChunks(nn.Module):
    """This pipeline rank's model chunks (virtual_pp > 1) seen as one model for checkpoints and metrics:
    their parameter names are disjoint global names, so the sharded state dict is the union."""

    def __init__(self, chunks: list[nn.Module]):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: dict | None = None) -> dict:
        out = {}
        for chunk in self.chunks:
            out.update(chunk.sharded_state_dict(prefix))
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        results = []
        for chunk in self.chunks:
            own = chunk.state_dict()
            results.append(chunk.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=strict))
        return results

    def state_dict(self, *args, **kwargs):
        out = {}
        for chunk in self.chunks:
            out.update(chunk.state_dict(*args, **kwargs))
        return out

    def moe_layers(self) -> list:
        return [layer for chunk in self.chunks for layer in chunk.moe_layers()]

    def num_parameters(self) -> dict[str, int]:
        return global_num_parameters(list(self.chunks))


def global_num_parameters(chunks: list[nn.Module]) -> dict[str, int]:
    """Whole-model parameter counts: this rank's chunks summed over the pipeline group."""
    local = [0, 0]
    for chunk in chunks:
        counts = chunk.local_num_parameters()
        local[0] += counts["total"]
        local[1] += counts["active"]
    if state.pp_size() == 1:
        return {"total": local[0], "active": local[1]}
    t = torch.tensor(local, dtype=torch.int64, device=collective_device(state.pp_group()))
    dist.all_reduce(t, group=state.pp_group())
    return {"total": int(t[0]), "active": int(t[1])}


def moe_loads_by_layer(chunks: list[nn.Module], loads_per_chunk: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Every MoE layer's load of the whole model in layer order, on every pipeline rank (each rank
    computed its own layers' loads)."""
    mine = []
    for chunk, loads in zip(chunks, loads_per_chunk):
        indices = [int(name.split(".")[1]) for name, m in chunk.named_modules() if hasattr(m, "update_expert_bias")]
        mine.extend(zip(indices, [load.detach().cpu() for load in loads]))
    if state.pp_size() == 1:
        return [load for _, load in sorted(mine, key=lambda x: x[0])]
    gathered = [None] * state.pp_size()
    dist.all_gather_object(gathered, mine, group=state.pp_group())
    return [load for _, load in sorted((x for part in gathered for x in part), key=lambda x: x[0])]


def sum_tied_embedding_grads(chunks: list[nn.Module]) -> None:
    """Tied embeddings: the first stage's embedding and the last stage's copy used as the head get
    the sum of both local gradients (megatron's embedding group), before the dp reduction."""
    from megatron.core import parallel_state as ps

    if not ps.is_rank_in_embedding_group(ignore_virtual=True):
        return
    for chunk in chunks:
        if (chunk.pre_process or chunk.post_process) and hasattr(chunk, "embeddings"):
            weight = chunk.embeddings.weight
            dist.all_reduce(weight.main_grad, group=ps.get_embedding_group())


def run_schedule(ddp_chunks: list, chunks: list[nn.Module], batches: list[dict[str, torch.Tensor]],
                 seq_len: int, z_loss_coeff: float, forward_only: bool = False) -> torch.Tensor:
    """Forward and backward of all `batches` (one optimizer step's micro-batches of this dp rank)
    through megatron-core's pipeline schedule; gradients accumulate in the DDP buffers, each
    micro-batch's loss scaled by 1/len(batches). Returns the mean cross-entropy over the
    micro-batches (detached) on every pipeline rank. forward_only: no backward (evaluation)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel.moe import set_aux_loss_scale

    num_microbatches = len(batches)
    cp = state.cp_size()
    # MoE aux losses weighted as the loss is (cp: see loss_from_logits); megatron's schedules set the
    # same scale themselves only when their config names the experts (ep > 1)
    set_aux_loss_scale(cp / num_microbatches, batches[0]["tokens"].device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inner = model.module if hasattr(model, "module") else model
        output = inner.stage_forward(batch["tokens"], batch["seq_idx"])
        if not inner.post_process:
            return output, None

        def loss_func(output):  # the vocab-parallel logits, or the hidden states of a chunked loss
            loss, ce = inner.stage_loss(output, batch["labels"], z_loss_coeff)
            # megatron multiplies by cp and divides by num_microbatches; our loss holds the cp factor already
            return loss / cp, {"ce": ce}

        return output, loss_func

    iterators = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=ddp_chunks if len(chunks) > 1 else ddp_chunks[0], num_microbatches=num_microbatches,
        seq_length=seq_len, micro_batch_size=batches[0]["tokens"].shape[0], forward_only=forward_only)
    ce = torch.zeros((), dtype=torch.float32, device=collective_device(state.pp_group()))
    if losses:  # the last stage: one dict per micro-batch
        ce = torch.stack([d["ce"].float() for d in losses]).mean().to(ce.device)
    dist.all_reduce(ce, group=state.pp_group())  # only the last stage contributes
    return ce
