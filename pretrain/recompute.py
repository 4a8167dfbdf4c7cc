"""Activation recomputation (`trainer.recompute`): which residual blocks save only their input for the
backward pass and run their forward again there, trading compute for activation memory.

Policies: "none"; "full" (every block); or a comma-separated list of block kinds (mamba, attention,
mlp, moe): selective recomputation, e.g. "mamba,moe". Both model builds (pretrain/model.py and
parallel/model.py) run their blocks through `run_block`, with torch.utils.checkpoint (non-reentrant:
tensors saved anywhere inside the block, the MoE aux loss included, are recomputed on use).

Side effects of a block's forward must happen once: `is_recomputing()` is true while a block's
forward is rerun in the backward pass, and the MoE routing counters (pretrain/layers/moe.py) are
only updated outside it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

KINDS = ("mamba", "attention", "mlp", "moe")

_recomputing = 0


def parse_policy(policy: str) -> frozenset[str]:
    """"none" | "full" | "kind[,kind...]" -> the block kinds to recompute; ValueError naming what is wrong."""
    text = policy.strip().lower()
    if text in ("", "none"):
        return frozenset()
    if text == "full":
        return frozenset(KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown block kind(s) {unknown or [policy]}: use none, full or a comma-separated "
                         f"subset of {', '.join(KINDS)}")
    return frozenset(kinds)


def is_recomputing() -> bool:
    """True while a checkpointed block's forward is being rerun for the backward pass."""
    return _recomputing > 0


@contextlib.contextmanager
def _recomputation():
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def _contexts():
    return contextlib.nullcontext(), _recomputation()


def run_block(block: torch.nn.Module, hidden: torch.Tensor, seq_idx: torch.Tensor | None,
              kinds: frozenset[str]) -> torch.Tensor:
    """block(hidden, seq_idx), checkpointed when its `kind` is in `kinds` and gradients are on."""
    if block.kind in kinds and torch.is_grad_enabled():
        return checkpoint(block, hidden, seq_idx, use_reentrant=False, context_fn=_contexts)
    return block(hidden, seq_idx)
