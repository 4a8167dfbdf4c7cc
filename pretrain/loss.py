"""Language-model loss: token cross-entropy (mean over labelled tokens) plus optional z-loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, seqlen, vocab), labels (batch, seqlen) -> (loss to optimise, cross-entropy for logging).

    Cross-entropy is computed in float32 (float64 logits stay float64); z-loss = coeff x mean over the
    labelled tokens of logsumexp(logits)^2 (PaLM). pretrain/chunked_loss.py computes the same without
    the whole logits."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)
    labels = labels.flatten()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if z_loss_coeff <= 0:
        return ce, ce.detach()
    mask = labels != IGNORE_INDEX
    z = torch.logsumexp(logits[mask], dim=-1)
    return ce + z_loss_coeff * z.square().mean(), ce.detach()
