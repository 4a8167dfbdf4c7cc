"""Shared pieces of the tensor-parallel layers: how each local tensor relates to its global tensor,
megatron-core's config, and the few autograd collectives megatron-core does not provide.

Shard specs. Every parameter and persistent buffer of the parallel model carries `_hp_spec`, a
`Spec(dim, parts)`: along `dim` the global tensor is the concatenation of `parts`, and each part
(z, x, B, C, dt of Mamba's in_proj, or the single part of an ordinary weight) is cut into
`num_parts` equal pieces of which this rank holds piece `index`. Ranks that hold the same piece are
replicas (`replica` 0 is the main one). A part may be cut into fewer pieces than tp (B and C when
ngroups < tp, k/v when kv heads < tp): such a part is replicated over tp/num_parts ranks, each of
which computes only a partial gradient for it (`partial_grad`), summed in parallel.grads.
The spec drives three things: loading a full (single-process) state dict, the gradient sync of
partially replicated parts, and the checkpoint layout (parallel.checkpointing), which therefore
never depends on tp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel import state


@dataclass(frozen=True)
class Part:
    name: str  # "" for a tensor of one part
    size: int  # global length along the spec's dim
    num_parts: int  # pieces the part is cut into (<= tp)
    index: int  # the piece this rank holds
    replica: int = 0  # 0 on the main holder of that piece
    partial_grad: bool = False  # replicas compute partial gradients that must be summed over tp

    @property
    def local_size(self) -> int:
        return self.size // self.num_parts


@dataclass(frozen=True)
class Spec:
    dim: int
    parts: tuple[Part, ...]
    sequence_parallel: bool = False  # replicated over tp, gradient partial over sequence shards


def split_part(name: str, size: int) -> Part:
    """Cut into tp pieces (heads, channels, vocab rows)."""
    return Part(name, size, state.tp_size(), state.tp_rank())


def grouped_part(name: str, size: int, num_groups: int) -> Part:
    """A part made of `num_groups` equal groups: cut by tp when groups >= tp, else each rank holds the
    one group its heads use (replicated over tp / num_groups ranks, partial gradients)."""
    tp, rank = state.tp_size(), state.tp_rank()
    if num_groups >= tp:
        return Part(name, size, tp, rank)
    per_group = tp // num_groups
    return Part(name, size, num_groups, rank // per_group, rank % per_group, partial_grad=True)


def replicated_part(name: str, size: int) -> Part:
    return Part(name, size, 1, 0, state.tp_rank())


def set_spec(tensor: torch.Tensor, dim: int, *parts: Part, sequence_parallel: bool = False) -> None:
    spec = Spec(dim, tuple(parts), sequence_parallel)
    local = sum(p.local_size for p in parts)
    if tensor.shape[dim] != local:
        raise ValueError(f"spec of {tuple(tensor.shape)} along dim {dim} covers {local} entries")
    tensor._hp_spec = spec  # type: ignore[attr-defined]
    if isinstance(tensor, nn.Parameter):
        split = any(p.num_parts > 1 for p in parts)
        # megatron's grad-norm and clipping read these attributes to skip tp duplicates
        tensor.tensor_model_parallel = split  # type: ignore[attr-defined]
        tensor.partition_dim = dim if split else -1  # type: ignore[attr-defined]
        tensor.partition_stride = 1  # type: ignore[attr-defined]
        if sequence_parallel:
            tensor.sequence_parallel = True  # type: ignore[attr-defined]


def spec_of(tensor: torch.Tensor) -> Spec:
    spec = getattr(tensor, "_hp_spec", None)
    if spec is None:
        return Spec(0, (Part("", tensor.shape[0] if tensor.ndim else 1, 1, 0, state.tp_rank()),))
    return spec


def shard_full(full: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The local piece of a full (single-process) tensor."""
    if full.ndim == 0:
        return full
    pieces, start = [], 0
    for part in spec.parts:
        whole = full.narrow(spec.dim, start, part.size)
        pieces.append(whole.narrow(spec.dim, part.index * part.local_size, part.local_size))
        start += part.size
    if start != full.shape[spec.dim]:
        raise ValueError(f"spec covers {start} of {full.shape[spec.dim]} entries along dim {spec.dim}")
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=spec.dim)


def local_parts(tensor: torch.Tensor, spec: Spec) -> list[tuple[Part, torch.Tensor]]:
    """(part, view of its local piece) for each part of `tensor`."""
    out, start = [], 0
    for part in spec.parts:
        out.append((part, tensor.narrow(spec.dim, start, part.local_size)))
        start += part.local_size
    return out


def megatron_config(cfg, *, num_layers: int):
    """megatron-core's TransformerConfig for our parallel linears and its DDP / optimizer."""
    from megatron.core.transformer import TransformerConfig

    on_cuda = torch.cuda.is_available()
    tp = state.tp_size()
    bf16 = on_cuda and cfg.trainer.precision in ("auto", "bf16")
    # megatron needs the MoE sizes to accept ep > 1; its all-to-all dispatcher reads them (parallel/moe.py)
    experts = megatron_moe_fields(cfg.model.moe) if cfg.parallel.ep > 1 else {}
    pipeline = {}
    if cfg.parallel.pp > 1:
        # p2p buffers in the parameters' dtype. On the CPU (gloo) no batched p2p: gloo matches a batch's
        # sends and receives per peer in posting order, and at pp=2 (previous = next rank) the batch's
        # order (send_prev, recv_prev, send_next, recv_next) pairs activations with gradients; megatron's
        # unbatched path orders by rank parity and uses two groups for the two directions.
        pipeline = dict(pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
                        batch_p2p_comm=on_cuda, batch_p2p_sync=on_cuda,
                        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pp)
    return TransformerConfig(
        num_layers=max(num_layers, 1), hidden_size=cfg.model.d_model, num_attention_heads=tp,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=cfg.parallel.pp,
        context_parallel_size=cfg.parallel.cp, expert_model_parallel_size=cfg.parallel.ep,
        sequence_parallel=cfg.parallel.sequence_parallel and tp > 1,
        use_cpu_initialization=True, perform_initialization=False,  # weights come from the full model
        params_dtype=torch.float32, bf16=bf16, gradient_accumulation_fusion=False,
        add_bias_linear=False, **experts, **pipeline,
    )


def megatron_moe_fields(moe) -> dict:
    """Our MoEConfig in megatron-core's TransformerConfig terms (its TopKRouter and token dispatcher)."""
    k, softmax = moe.top_k, moe.router == "softmax_aux"
    return dict(
        num_moe_experts=moe.num_experts, moe_ffn_hidden_size=moe.d_ff, moe_router_topk=k,
        moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=moe.capacity_factor,
        moe_router_score_function="softmax" if softmax else "sigmoid",
        moe_router_load_balancing_type="aux_loss" if softmax else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff if softmax else 0.0,
        moe_router_enable_expert_bias=not softmax, moe_router_bias_update_rate=moe.bias_update_rate,
        # softmax over all experts before the top k: un-normalised gate weights (and always at k = 1,
        # where a softmax over the one chosen logit would be 1 with no gradient); after it: normalised
        moe_router_pre_softmax=softmax and (not moe.norm_topk_prob or k == 1),
        moe_router_topk_scaling_factor=moe.routed_scaling_factor if moe.routed_scaling_factor != 1.0 else None,
        moe_router_dtype="fp32")


class _AllReduceBoth(torch.autograd.Function):
    """Sum over the tp group in forward and in backward (each rank uses the sum differently)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=state.tp_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=state.tp_group())
        return grad


def all_reduce_tp_both(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceBoth.apply(x) if state.tp_size() > 1 else x


class LocalLinear(nn.Module):
    """y = x @ weight.T with a local weight and no communication (expert slices: the MoE layer
    communicates once for all experts)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


def column_linear(mcfg, d_in: int, parts: list[Part], bias: bool, gather_output: bool = False):
    """megatron ColumnParallelLinear whose local output is the concatenation of `parts`' pieces."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    local = sum(p.local_size for p in parts)
    layer = ColumnParallelLinear(d_in, local * state.tp_size(), config=mcfg, init_method=nn.init.zeros_,
                                 bias=bias, gather_output=gather_output)
    set_spec(layer.weight, 0, *parts)
    if bias:
        set_spec(layer.bias, 0, *parts)
    return layer


def row_linear(mcfg, parts: list[Part], d_out: int, bias: bool):
    """megatron RowParallelLinear over an input split like `parts` (all-reduce or reduce-scatter)."""
    from megatron.core.tensor_parallel import RowParallelLinear

    local = sum(p.local_size for p in parts)
    layer = RowParallelLinear(local * state.tp_size(), d_out, config=mcfg, init_method=nn.init.zeros_,
                              bias=bias, input_is_parallel=True, skip_bias_add=False)
    set_spec(layer.weight, 1, *parts)
    if bias:
        set_spec(layer.bias, 0, replicated_part("", d_out), sequence_parallel=mcfg.sequence_parallel)
    return layer
