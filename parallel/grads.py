"""Gradient synchronisation beyond data parallelism, after megatron DDP's finish_grad_sync, and the
global gradient norm with clipping.

- Parameters replicated over tp whose inputs differ per rank under sequence parallelism (norm
  weights, the MoE router, row-parallel biases): gradients summed over tp.
- Parts replicated over fewer than tp ranks (Mamba B/C when ngroups < tp; k/v when kv heads < tp):
  each replica computed a partial gradient; the partial gradients of each piece are summed over the
  ranks that hold that piece (via one tp all-reduce of a buffer with a slot per piece).
Works on `main_grad` (megatron DDP) or `grad`; with the distributed optimizer only this rank's dp
shard of each gradient is meaningful and stays correct (the sums are elementwise).

Gradient norm: megatron-core counts a tensor-parallel parameter on every tp rank, so a part
replicated over fewer than tp ranks (B/C, k/v above) would count once per replica.
`clipped_norm_step` runs megatron's optimizer step with the norm less those extra copies (the
elements this rank holds as a non-main replica, `Part.replica > 0`), and clips with it; the norm
and the clipping are torch multi-tensor ops with no host sync (megatron's own, without apex or
TransformerEngine, launch kernels and sync per tensor).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from parallel import state
from parallel.common import local_parts, spec_of
from pretrain.distributed import collective_device


def _grad(p: nn.Parameter):
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def sync_tp_grads(model: nn.Module) -> None:
    if state.tp_size() == 1:
        return
    group = state.tp_group()
    for p in model.parameters():
        grad = _grad(p)
        if grad is None:
            continue
        spec = spec_of(p)
        if spec.sequence_parallel:
            dist.all_reduce(grad, group=group)
            continue
        for part, piece in local_parts(grad, spec):
            if not part.partial_grad:
                continue
            slots = torch.zeros((part.num_parts, *piece.shape), dtype=piece.dtype, device=piece.device)
            slots[part.index].copy_(piece)
            dist.all_reduce(slots, group=group)
            piece.copy_(slots[part.index])


def finalize_grads(ddp_model, model: nn.Module) -> None:
    """dp reduction (megatron DDP; overlapped with backward when enabled), then the tp sums."""
    ddp_model.finish_grad_sync()
    sync_tp_grads(model)


def _replica_mask(p: nn.Parameter) -> torch.Tensor | None:
    """Bool mask of the elements of `p` that this rank holds as a non-main replica of a part that is
    cut over tp elsewhere in the tensor (None when there are none). Parameters with no tp-cut part are
    skipped: megatron counts those on tp rank 0 only already."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    spec = spec_of(p)
    if not any(part.replica > 0 for part in spec.parts):
        return None
    mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    for part, piece in local_parts(mask, spec):
        if part.replica > 0:
            piece.fill_(True)
    return mask


def _owned_range(leaf, p: nn.Parameter, plain_ids: set[int]) -> tuple[int, int] | None:
    """The flat element range of `p` whose gradient the optimizer `leaf` norms on this rank: the dp
    shard with megatron's distributed optimizer, the whole tensor otherwise (plain_ids: the ids of
    a non-distributed leaf's parameters); None if not its param."""
    gbuf_map = getattr(leaf, "model_param_gbuf_map", None)
    if gbuf_map is None:
        return (0, p.numel()) if id(p) in plain_ids or id(getattr(p, "main_param", p)) in plain_ids else None
    if p not in gbuf_map:
        return None
    owned = leaf._get_model_param_range_map(p)["param"]  # megatron-core 0.16.1 (pinned)
    return owned.start, owned.end


def _duplicate_grad_sq(leaf, params: list[nn.Parameter]) -> torch.Tensor:
    """Sum of squares, over the ranks `leaf` reduces its norm over, of the gradient elements it counted
    more than once (the non-main replicas of partially replicated parts)."""
    total = torch.zeros((), dtype=torch.float32)
    masked = [(p, mask) for p in params if (mask := _replica_mask(p)) is not None]
    plain_ids = ({id(q) for g in leaf.optimizer.param_groups for q in g["params"]}
                 if masked and getattr(leaf, "model_param_gbuf_map", None) is None and leaf.optimizer else set())
    for p, mask in masked:
        owned = _owned_range(leaf, p, plain_ids)
        if owned is None:
            continue
        lo, hi = owned
        grad = _grad(p).reshape(-1)[lo:hi].float()
        total = total.to(grad.device) + grad[mask.reshape(-1)[lo:hi]].square().sum()
    group = leaf.get_grad_stats_parallel_group()  # None: the world, as in megatron's get_grad_norm_fp32
    total = total.to(collective_device(group))
    dist.all_reduce(total, group=group)
    return total


def _leaf_grad_sq(leaf) -> torch.Tensor:
    """Sum of squares of the main gradients `leaf` norms, summed over its grad-stats group: what
    megatron's get_grad_norm squares, with torch's multi-tensor norm (one kernel per device and dtype,
    no host sync) instead of megatron's fallback without apex or TransformerEngine (a norm kernel and
    a host sync per tensor)."""
    grads = [g for g in leaf.get_main_grads_for_grad_norm() if g.numel()]
    group = leaf.get_grad_stats_parallel_group()  # None: the world, as in megatron's get_grad_norm_fp32
    device = collective_device(group)
    if grads:
        total = torch.stack(torch._foreach_norm(grads)).float().square().sum().to(device)
    else:
        total = torch.zeros((), dtype=torch.float32, device=device)
    dist.all_reduce(total, group=group)
    return total


def clipped_norm_step(optimizer, params: list[nn.Parameter], max_norm: float) -> tuple[bool, torch.Tensor]:
    """megatron's optimizer step (a ChainedOptimizer or one optimizer) with the corrected global
    gradient norm: prepare the main gradients, norm, clip to `max_norm` (0: no clipping), update.
    Returns (updated, norm before clipping as a 0-d float32 tensor); (False, nan) when megatron found
    inf/nan gradients. No host sync: the clip coefficient min(1, max_norm / (norm + 1e-6)), megatron's,
    stays a device tensor and multiplies every gradient (by exactly 1 when under the bound)."""
    if optimizer.prepare_grads():
        return False, torch.tensor(math.nan)
    leaves = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    real = [leaf for leaf in leaves if not getattr(leaf, "is_stub_optimizer", False)]
    # megatron's chain: the square root of the sum of its optimizers' squared norms. A stub (no
    # parameters on this rank) still joins its group's reduction with zero, as in megatron.
    norm_sq = sum(_leaf_grad_sq(leaf) for leaf in leaves) - sum(_duplicate_grad_sq(leaf, params) for leaf in real)
    norm = torch.as_tensor(norm_sq, dtype=torch.float32).clamp_min(0.0).sqrt()
    if max_norm > 0:
        coeff = (max_norm / (norm + 1.0e-6)).clamp(max=1.0)
        for leaf in real:
            grads = [p.grad for p in leaf.get_parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coeff.to(grads[0].device))
    return optimizer.step_with_ready_grads(), norm
