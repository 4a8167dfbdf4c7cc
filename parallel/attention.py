"""Tensor-parallel causal GQA attention: q/k/v column-parallel by heads, o_proj row-parallel.

kv heads are split over tp when there are at least tp of them; otherwise each rank holds the one
kv head its query heads use (replicated over tp / kv_heads ranks; partial gradients are summed in
parallel.grads). Same math and names as pretrain.layers.attention.Attention. Input/output
(seqlen[/tp with SP], batch, d_model).
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import state
from parallel.common import column_linear, grouped_part, row_linear, split_part
from pretrain.config import AttentionConfig
from pretrain.layers.attention import apply_rope, causal_attention, rope_tables


class ParallelAttention(nn.Module):
    def __init__(self, d_model: int, cfg: AttentionConfig, head_dim: int, *, mcfg):
        super().__init__()
        tp = state.tp_size()
        self.cfg, self.head_dim = cfg, head_dim
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = max(cfg.num_kv_heads // tp, 1)
        q = split_part("", cfg.num_heads * head_dim)
        kv = grouped_part("", cfg.num_kv_heads * head_dim, cfg.num_kv_heads)
        self.q_proj = column_linear(mcfg, d_model, [q], bias=cfg.bias)
        self.k_proj = column_linear(mcfg, d_model, [kv], bias=cfg.bias)
        self.v_proj = column_linear(mcfg, d_model, [kv], bias=cfg.bias)
        self.o_proj = row_linear(mcfg, [q], d_model, bias=cfg.bias)

    def _heads(self, proj, hidden, num_heads):
        out, _ = proj(hidden)  # (seqlen, batch, heads * head_dim)
        seqlen, batch, _ = out.shape
        return out.view(seqlen, batch, num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.q_proj, hidden, self.num_heads)  # (batch, heads, seqlen, head_dim)
        k = self._heads(self.k_proj, hidden, self.num_kv_heads)
        v = self._heads(self.v_proj, hidden, self.num_kv_heads)
        batch, _, seqlen, _ = q.shape
        if self.cfg.rope:
            cos, sin = rope_tables(seqlen, self.head_dim, self.cfg.rope_theta, q.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, seq_idx)  # (batch, heads, seqlen, head_dim)
        out = out.permute(2, 0, 1, 3).reshape(seqlen, batch, self.num_heads * self.head_dim)
        return self.o_proj(out)[0]
