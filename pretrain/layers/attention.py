"""Causal grouped-query self-attention with document masking for packed sequences.

RoPE is optional (off by default, as in Jamba and Nemotron-H). With seq_idx, a position attends
only to earlier positions of its own document. On CUDA in bf16/fp16, packed documents go through
FlashAttention's variable-length kernel (`torch.nn.attention.varlen`), which skips every block
across documents; elsewhere (CPU, float32, a torch without it) SDPA with a dense (batch, 1, s, s)
mask, the reference the GPU tests hold the varlen path to. The document offsets of a seq_idx
(one host sync for the document count) are computed once per forward, not per layer
(`document_layout`), by the residual block before anything else (`block_layout`): under
torch.compile that deliberate break then falls at the block's first statement and the rest of the
block is one graph (called three frames deep, in causal_attention, it split the block into five).
"""
from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import AttentionConfig
from pretrain.layers.linear import Linear


def rope_tables(seqlen: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seqlen, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q (batch, heads, seqlen, head_dim), rotate-half convention."""
    q1, q2 = q.chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, seqlen) -> bool mask (batch, 1, seqlen, seqlen): True where attention is allowed."""
    seqlen = seq_idx.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=seq_idx.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    return (same_doc & causal)[:, None]


def document_cu_seqlens(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, seqlen) -> int32 (num_documents + 1,): the start offsets of every document of
    the flattened (batch * seqlen) tokens, then batch * seqlen. A new document starts at each row's
    first position and wherever seq_idx changes. One host sync (the number of documents)."""
    batch, seqlen = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    end = torch.full((1,), batch * seqlen, dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, end]).to(torch.int32)


_LAYOUTS: list[tuple] = []  # (weakref to seq_idx, its version, one document per row, cu_seqlens), newest last
_LAYOUTS_KEPT = 8  # enough for the micro-batches a pipeline schedule keeps in flight


@torch.compiler.disable
def document_layout(seq_idx: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """(whether every row holds one document, document_cu_seqlens(seq_idx)), computed once per
    seq_idx tensor and in-place version: every attention layer of a forward (and its recomputation)
    gets the same seq_idx, so the one host sync (the document count) happens once per forward, not
    once per layer. Entries hold the tensor weakly; an in-place change of seq_idx is a miss."""
    for ref, version, single, cu in reversed(_LAYOUTS):
        if ref() is seq_idx and version == seq_idx._version:
            return single, cu
    cu = document_cu_seqlens(seq_idx)
    single = cu.numel() - 1 == seq_idx.shape[0]  # each row starts one document at position 0
    _LAYOUTS[:] = [e for e in _LAYOUTS if e[0]() is not None][-(_LAYOUTS_KEPT - 1):]
    _LAYOUTS.append((weakref.ref(seq_idx), seq_idx._version, single, cu))
    return single, cu


DocumentLayout = tuple[bool, torch.Tensor]  # (one document per row, document_cu_seqlens), document_layout's result


def block_layout(kind: str, seq_idx: torch.Tensor | None) -> dict:
    """The keyword arguments a residual block of `kind` adds to its mixer call: {"layout":
    document_layout(seq_idx)} for attention with documents, nothing otherwise. Call it first in the
    block's forward (see the module docstring)."""
    if kind != "attention" or seq_idx is None:
        return {}
    return {"layout": document_layout(seq_idx)}


def _detect_varlen() -> tuple | None:
    """(varlen_attn, the kwargs that ask it for causal + GQA), or None where this torch has none
    (the call changed between torch 2.10 and 2.12: is_causal -> window_size, enable_gqa added).
    Run once at import, outside any torch.compile trace."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kwargs = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kwargs = {"is_causal": True}
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


_VARLEN = _detect_varlen()


def uses_varlen(q: torch.Tensor) -> bool:
    """Whether packed documents take the FlashAttention varlen kernel for this query."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256
            and _VARLEN is not None)


def varlen_causal_attention(q, k, v, cu: torch.Tensor) -> torch.Tensor:
    """q (batch, heads, seqlen, hd), k/v (batch, kv_heads, seqlen, hd), cu = document_cu_seqlens(seq_idx)
    -> (batch, heads, seqlen, hd): every document of every row attends causally to itself only."""
    varlen_attn, kwargs = _VARLEN
    batch, heads, seqlen, head_dim = q.shape
    if not kwargs.get("enable_gqa") and k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)

    def tokens_major(t):  # (batch, h, s, hd) -> (batch * s, h, hd); a view where t came from (b, s, h, hd)
        return t.transpose(1, 2).reshape(batch * seqlen, t.shape[1], head_dim)

    out = varlen_attn(tokens_major(q), tokens_major(k), tokens_major(v), cu, cu, seqlen, seqlen, **kwargs)
    return out.view(batch, seqlen, heads, head_dim).transpose(1, 2)


def causal_attention(q, k, v, seq_idx: torch.Tensor | None, layout: DocumentLayout | None = None) -> torch.Tensor:
    """q (batch, heads, seqlen, hd), k/v (batch, kv_heads, seqlen, hd) -> (batch, heads, seqlen, hd).
    `layout`: document_layout(seq_idx) where the caller has it (computed here otherwise)."""
    gqa = q.shape[1] != k.shape[1]
    if seq_idx is None:
        single, cu = True, None
    else:
        single, cu = layout if layout is not None else document_layout(seq_idx)
    # rows of one document each: whole-row causal flash (faster than varlen over the same rows)
    if single:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if uses_varlen(q):
        return varlen_causal_attention(q, k, v, cu)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq_idx), enable_gqa=gqa)


class Attention(nn.Module):
    """Input/output (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, cfg: AttentionConfig, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, head_dim
        self.q_proj = Linear(d_model, cfg.num_heads * head_dim, bias=cfg.bias)
        self.k_proj = Linear(d_model, cfg.num_kv_heads * head_dim, bias=cfg.bias)
        self.v_proj = Linear(d_model, cfg.num_kv_heads * head_dim, bias=cfg.bias)
        self.o_proj = Linear(cfg.num_heads * head_dim, d_model, bias=cfg.bias)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None,
                layout: DocumentLayout | None = None) -> torch.Tensor:
        batch, seqlen, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.cfg.rope:
            cos, sin = rope_tables(seqlen, self.head_dim, self.cfg.rope_theta, q.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, seq_idx, layout)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.num_heads * self.head_dim))
