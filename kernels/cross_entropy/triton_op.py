"""Triton row-wise softmax cross-entropy with the logit gradient written in place (one kernel per chunk).

Owns `cross_entropy_rows` for the Triton path; contract and shapes as in
kernels.cross_entropy.reference: logits (n, vocab) bf16/fp16/fp32, target (n,) int64,
row_scale (n,) float32 -> lse (n,) float32, target_logit (n,) float32; with want_grad the
gradient replaces logits. Grid: (n,), one program per row, walking the vocabulary in BLOCK_V
slices twice: an online max / sum-of-exponentials pass, then the gradient pass. Memory traffic per
logit: two reads and one write in the logits' dtype (the PyTorch path makes a float32 copy and
runs ~7 passes over it: ~44 bytes per logit for bf16 logits vs 6 here). All offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_utils import next_pow2
from kernels.cross_entropy.reference import check_args


@triton.jit
def _ce_rows_kernel(logits_ptr, target_ptr, scale_ptr, lse_ptr, tgt_ptr, vocab, s_row, z_loss_coeff,
                    WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * s_row
    offs = tl.arange(0, BLOCK_V)
    # pass 1: running max m and sum of exp(x - m) over the vocabulary
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(target_ptr + row)
    tl.store(lse_ptr + row, lse)
    tl.store(tgt_ptr + row, tl.load(base + target).to(tl.float32))
    if WANT_GRAD:
        scale = tl.load(scale_ptr + row)
        probs_scale = scale * (1.0 + 2.0 * z_loss_coeff * lse)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            cmask = cols < vocab
            x = tl.load(base + cols, mask=cmask, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - lse) * probs_scale - tl.where(cols == target, scale, 0.0)
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cmask)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
                       z_loss_coeff: float = 0.0, want_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton row-wise cross-entropy; same contract as kernels.cross_entropy.reference.cross_entropy_rows."""
    check_args(logits, target, row_scale)
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary, strides {logits.stride()}")
    rows, vocab = logits.shape
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    target_logit = torch.empty_like(lse)
    if rows == 0:
        return lse, target_logit
    block = min(8192, next_pow2(vocab))
    _ce_rows_kernel[(rows,)](
        logits, target, row_scale.to(torch.float32).contiguous(), lse, target_logit, vocab, logits.stride(0),
        float(z_loss_coeff), WANT_GRAD=want_grad, BLOCK_V=block, num_warps=8 if block >= 4096 else 4,
    )
    return lse, target_logit
