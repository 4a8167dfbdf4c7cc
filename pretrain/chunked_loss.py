"""Chunked linear + cross-entropy: the LM head and pretrain/loss.py's loss without whole logits.

`lm_loss(hidden @ W^T, labels, z)` materialises float32 logits of shape (tokens, vocab), their
gradient and the autocast copies: at 8 x 4096 tokens and a 50304 vocabulary each float32 copy is
6.6 GB. Here the flattened tokens are cut into chunks of `chunk_tokens` rows. For each chunk:
logits = hidden_chunk @ W^T in the compute dtype (autocast's when autocast is on, as
nn.functional.linear would use; else the inputs'), upcast to at least float32, logsumexp,
cross-entropy and z-loss sums, and at once the gradient of the micro-batch loss w.r.t. the
chunk's logits, which is multiplied into d hidden (the chunk's rows) and accumulated into d W
(float32, or float64 for float64 inputs; on CUDA in bf16 inside the GEMM: pretrain/layers/linear.py's
accumulate_wgrad_). The per-row softmax, loss terms and logit gradient are
kernels.cross_entropy's `cross_entropy_rows` (a Triton kernel on CUDA: one read pass, one
read-and-write pass over the compute-dtype logits; the PyTorch reference elsewhere). Backward only scales the stored gradients by the
incoming gradient, so the head costs the same three matmuls as the unchunked path and the extra
memory is O(chunk x vocab) for the chunk plus d hidden (tokens, d_model) and d W (vocab, d_model).

Math, with C = number of labelled tokens (label != -100) of the whole micro-batch, clamped to >= 1:
    lse_r  = logsumexp_v logits_rv
    ce     = sum_r (lse_r - logits_{r, y_r}) / C
    z-loss = coeff x sum_r lse_r^2 / C                      (PaLM; coeff = trainer.z_loss_coeff)
    d(ce + z-loss) / d logits_rv = ((1 + 2 coeff lse_r) softmax_rv - [v == y_r]) / C
Unlabelled rows contribute nothing. With no labelled token at all the loss is 0 (pretrain/loss.py
returns NaN there; the parallel build's loss clamps the count the same way as here).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.cross_entropy.op import cross_entropy_rows
from pretrain.layers.linear import accumulate_wgrad_, compute_dtype
from pretrain.loss import IGNORE_INDEX

AUTO_CHUNK_TOKENS = 4096  # trainer.loss_chunk_tokens=null on CUDA: 4096 x 50304 x 6 bytes ~ 1.2 GB per chunk


def resolve_chunk_tokens(setting: int | None, device: torch.device) -> int:
    """trainer.loss_chunk_tokens -> tokens per chunk (0 = off): null means AUTO_CHUNK_TOKENS on CUDA
    and off elsewhere (the CPU float32 path keeps the exact unchunked losses of the demo golden test)."""
    if setting is None:
        return AUTO_CHUNK_TOKENS if device.type == "cuda" else 0
    return setting


def _chunk_pass(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float,
                chunk_tokens: int, dtype: torch.dtype, want_d_hidden: bool, want_d_weight: bool):
    """hidden (tokens, d_model), weight (vocab, d_model), labels (tokens,) int64 ->
    (loss, ce, d_hidden (tokens, d_model) | None, d_weight (vocab, d_model) | None), the gradients in
    float32 or wider (float64 for float64 inputs).

    loss and ce are 0-dim in the accumulation dtype (float32, float64 for float64 inputs); the
    gradients are those of `loss` (d loss / d hidden, d loss / d weight)."""
    acc = torch.promote_types(dtype, torch.float32)
    num_tokens = hidden.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        h_all = hidden.to(dtype)
        w = weight.to(dtype)
        count = (labels != IGNORE_INDEX).sum().clamp(min=1).to(acc)  # stays on the device: no host sync
        ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
        z_sum = torch.zeros((), dtype=acc, device=hidden.device)
        d_hidden = torch.empty(hidden.shape, dtype=torch.promote_types(hidden.dtype, acc),
                               device=hidden.device) if want_d_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_d_weight else None
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            h = h_all[start:end]  # (n, d_model)
            logits = torch.mm(h, w.t())  # (n, vocab) in the compute dtype
            label = labels[start:end]
            labelled = label != IGNORE_INDEX
            weight_r = labelled.to(acc)
            # lse, the label's logit, and d loss / d logits in place of the logits (kernels/cross_entropy)
            lse, target_logit = cross_entropy_rows(logits, torch.where(labelled, label, 0), weight_r / count,
                                                   z_loss_coeff, want_grad=want_d_hidden or want_d_weight)
            ce_sum += ((lse - target_logit) * weight_r).sum()
            if z_loss_coeff > 0:
                z_sum += (lse.square() * weight_r).sum()
            if not (want_d_hidden or want_d_weight):
                continue
            grad = logits  # (n, vocab) in the compute dtype, as the unchunked linear's backward sees it
            if want_d_hidden:
                d_hidden[start:end] = torch.mm(grad, w)
            if want_d_weight:  # bf16/fp16 on CUDA: one GEMM with a float32 output and beta = 1
                accumulate_wgrad_(d_weight, grad, h)
        loss = ce_sum / count
        if z_loss_coeff > 0:
            loss = loss + z_loss_coeff * (z_sum / count)
        return loss, (ce_sum / count).detach(), d_hidden, d_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(hidden (tokens, d_model), weight (vocab, d_model), labels (tokens,), ...) -> (loss, ce);
    gradients w.r.t. hidden and weight are computed in the forward and saved."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss_coeff, chunk_tokens, dtype):
        loss, ce, d_hidden, d_weight = _chunk_pass(hidden, weight, labels, z_loss_coeff, chunk_tokens, dtype,
                                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.input_dtypes = hidden.dtype, weight.dtype
        return loss, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_ce):
        d_hidden, d_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        grad_hidden = None if d_hidden is None else (d_hidden * grad_loss).to(hidden_dtype)
        grad_weight = None if d_weight is None else (d_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float = 0.0,
                    chunk_tokens: int = AUTO_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (batch, seqlen, d_model), weight (vocab, d_model), labels (batch, seqlen) ->
    (loss to optimise, cross-entropy for logging): the value of
    `lm_loss(nn.functional.linear(hidden, weight), labels, z_loss_coeff)` without its (tokens, vocab)
    logits. Any leading shape works as long as hidden's matches labels' plus d_model."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be > 0")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    dtype = compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, float(z_loss_coeff), chunk_tokens, dtype)
    loss, ce, _, _ = _chunk_pass(hidden, weight, labels, float(z_loss_coeff), chunk_tokens, dtype, False, False)
    return loss, ce
