"""Gradient synchronisation beyond data parallelism, after megatron DDP's finish_grad_sync.

- Parameters replicated over tp whose inputs differ per rank under sequence parallelism (norm
  weights, the MoE router, row-parallel biases): gradients summed over tp.
- Parts replicated over fewer than tp ranks (Mamba B/C when ngroups < tp; k/v when kv heads < tp):
  each replica computed a partial gradient; the partial gradients of each piece are summed over the
  ranks that hold that piece (via one tp all-reduce of a buffer with a slot per piece).
Works on `main_grad` (megatron DDP) or `grad`; with the distributed optimizer only this rank's dp
shard of each gradient is meaningful and stays correct (the sums are elementwise).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel import state
from parallel.common import local_parts, spec_of


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
