"""Pure-PyTorch row-wise softmax cross-entropy with its logit gradient in place: the spec for the Triton kernel.

Owns `cross_entropy_rows`, the per-chunk step of pretrain/chunked_loss.py:

  logits (n, vocab) float32/bf16/fp16, target (n,) int64 in [0, vocab), row_scale (n,) float32,
  z_loss_coeff float >= 0  ->  lse (n,) float32 (float64 for float64 logits), target_logit (n,) same
  lse_r = logsumexp_v logits_rv;  target_logit_r = logits_{r, target_r}
  with want_grad, logits is overwritten with d/d logits of sum_r row_scale_r (lse_r - logits_{r,y_r} + c lse_r^2):
      grad_rv = row_scale_r ((1 + 2 c lse_r) softmax_rv - [v == y_r])        (in logits' dtype)

Rows whose row_scale is 0 (unlabelled tokens) get a zero gradient. The arithmetic runs in float32
(float64 for float64 logits) whatever the logits' dtype; the result is rounded once into logits.
"""
from __future__ import annotations

import torch


def check_args(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (rows, vocab), got {tuple(logits.shape)}")
    rows = logits.shape[0]
    if target.shape != (rows,) or row_scale.shape != (rows,):
        raise ValueError(f"target {tuple(target.shape)} and row_scale {tuple(row_scale.shape)} must be ({rows},)")


def accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
                       z_loss_coeff: float = 0.0, want_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. logits is modified in place when want_grad."""
    check_args(logits, target, row_scale)
    acc = accumulation_dtype(logits)
    work = logits.to(acc)  # the same tensor when logits is already float32/float64
    if work is logits and not want_grad:
        work = work.clone()  # the caller's logits stay as they are
    target_logit = work.gather(1, target[:, None]).squeeze(1)  # (n,)
    row_max = work.amax(dim=-1, keepdim=True)  # (n, 1)
    exp = work.sub_(row_max).exp_()  # exp(logits - max), in place in the float32 buffer
    sum_exp = exp.sum(dim=-1)  # (n,)
    lse = sum_exp.log() + row_max.squeeze(1)
    if want_grad:
        scale = row_scale.to(acc)
        probs_scale = scale * (1 + 2 * z_loss_coeff * lse) if z_loss_coeff > 0 else scale
        grad = exp.mul_((probs_scale / sum_exp)[:, None])
        grad.scatter_add_(1, target[:, None], -scale[:, None])
        if grad is not logits:
            logits.copy_(grad)
    return lse, target_logit
