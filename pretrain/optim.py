"""AdamW with decoupled weight decay on matrices only (no decay on norms, biases, A_log, D, dt_bias)."""
from __future__ import annotations

import torch
from torch import nn

from pretrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW, fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    on_cuda = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=True if on_cuda else None, foreach=None if on_cuda else True,
    )
