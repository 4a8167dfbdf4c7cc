"""Tensor-parallel causal GQA attention: q/k/v column-parallel by heads, o_proj row-parallel.

kv heads are split over tp when there are at least tp of them; otherwise each rank holds the one
kv head its query heads use (replicated over tp / kv_heads ranks; partial gradients are summed in
parallel.grads). Same math and names as pretrain.layers.attention.Attention. Input/output
(seqlen[/cp][/tp with SP], batch, d_model).

Context parallelism (parallel.context): q, k, v of the sequence shard are exchanged for whole
sequences of heads/cp heads (k/v heads repeated first when this rank holds fewer than cp), RoPE and
the document-masked causal core run on whole sequences, and the output is exchanged back.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import context, state
from parallel.common import column_linear, grouped_part, row_linear, split_part
from pretrain.config import AttentionConfig
from pretrain.layers.attention import DocumentLayout, apply_rope, causal_attention, rope_tables


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

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None,
                layout: DocumentLayout | None = None) -> torch.Tensor:
        if state.cp_size() > 1:
            return self.forward_context_parallel(hidden, seq_idx, layout)
        q = self._heads(self.q_proj, hidden, self.num_heads)  # (batch, heads, seqlen, head_dim)
        k = self._heads(self.k_proj, hidden, self.num_kv_heads)
        v = self._heads(self.v_proj, hidden, self.num_kv_heads)
        batch, _, seqlen, _ = q.shape
        if self.cfg.rope:
            cos, sin = rope_tables(seqlen, self.head_dim, self.cfg.rope_theta, q.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, seq_idx, layout)  # (batch, heads, seqlen, head_dim)
        out = out.permute(2, 0, 1, 3).reshape(seqlen, batch, self.num_heads * self.head_dim)
        return self.o_proj(out)[0]

    def forward_context_parallel(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None,
                                 layout: DocumentLayout | None = None) -> torch.Tensor:
        """hidden (s/cp[/tp], batch, d_model) -> the same; seq_idx (batch, s) of the whole sequence."""
        q, _ = self.q_proj(hidden)  # (s/cp, batch, heads * head_dim)
        k, _ = self.k_proj(hidden)
        v, _ = self.v_proj(hidden)
        s_local, batch, _ = q.shape
        q = q.view(s_local, batch, self.num_heads, self.head_dim)
        k = context.repeat_groups(k.view(s_local, batch, self.num_kv_heads, self.head_dim), self.num_kv_heads, 2)
        v = context.repeat_groups(v.view(s_local, batch, self.num_kv_heads, self.head_dim), self.num_kv_heads, 2)
        # (s, batch, heads/cp, head_dim) -> (batch, heads/cp, s, head_dim)
        q, k, v = (context.seq_to_heads(t).permute(1, 2, 0, 3) for t in (q, k, v))
        seqlen = q.shape[2]
        if self.cfg.rope:  # positions of the whole sequence
            cos, sin = rope_tables(seqlen, self.head_dim, self.cfg.rope_theta, q.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, seq_idx, layout)  # (batch, heads/cp, s, head_dim)
        out = context.heads_to_seq(out.permute(2, 0, 1, 3))  # (s/cp, batch, heads, head_dim)
        return self.o_proj(out.reshape(s_local, batch, self.num_heads * self.head_dim))[0]
