"""Tensor-parallel Mamba-2 mixer on megatron-core's parallel linears.

Same math and parameter names as pretrain.layers.mamba.Mamba2Mixer; per tp rank:
- in_proj: column-parallel, its output the concatenation of the local pieces of z (heads), x
  (heads), B and C (groups; with ngroups < tp each rank holds the group of its heads, replicated),
  dt (heads): every component is split separately, never the packed block.
- conv1d over the local x, B, C channels; A_log, D, dt_bias by head; SSD scan over local heads
  (with trainer.recompute part mamba_conv, the scan keeps the conv's input, not its output; with
  mamba_states it reruns its CB and chunk-state kernels in the backward instead of keeping them).
- grouped gated RMSNorm on local channels; when a norm group spans ranks (ngroups < tp) its
  sum of squares is reduced over tp. Otherwise the conv, scan and norm are kernels.mamba_inner's one
  node over the local packed projection (its layout is the single-process one with local sizes).
- out_proj: row-parallel (all-reduce, or reduce-scatter under sequence parallelism).
Input/output (seqlen[/cp][/tp with SP], batch, d_model) as megatron's layers expect; seq_idx
(batch, seqlen) covers the whole sequence.

Context parallelism (parallel.context): in_proj, the gated norm and out_proj stay on the sequence
shard; x, B, C (groups repeated when this rank holds fewer than cp) and dt are exchanged in one
all-to-all for whole sequences of nheads/cp heads, the conv1d and SSD scan run there with this cp
rank's slice of conv_weight/conv_bias/dt_bias/A_log/D, and y is exchanged back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.conv1d.op import causal_conv1d
from kernels.mamba_inner.op import MambaDims
from kernels.rmsnorm_gated.op import rmsnorm_gated
from kernels.ssd.op import ssd_scan
from parallel import context, state
from parallel.common import all_reduce_tp_both, column_linear, grouped_part, row_linear, set_spec, split_part
from pretrain.config import MambaConfig
from pretrain.layers.mamba import mixer_core


class ParallelMamba2Mixer(nn.Module):
    recompute_conv = False  # trainer.recompute part mamba_conv (pretrain.recompute.apply_policy)
    recompute_states = False  # likewise for mamba_states

    def __init__(self, d_model: int, cfg: MambaConfig, *, norm_eps: float, mcfg):
        super().__init__()
        tp = state.tp_size()
        self.cfg, self.norm_eps = cfg, norm_eps
        ng, ds, nh = cfg.num_groups, cfg.d_state, cfg.num_heads
        d_inner = nh * cfg.head_dim
        self.num_heads = nh // tp
        self.head_dim, self.d_state = cfg.head_dim, ds
        self.num_groups = max(ng // tp, 1)  # local groups
        self.d_inner = self.num_heads * cfg.head_dim
        self.group_size = d_inner // ng  # channels per norm group (global)
        self.dims = MambaDims(self.num_heads, cfg.head_dim, self.num_groups, ds)  # local sizes
        self.norm_spans_ranks = ng < tp
        self.global_groups = ng
        bc = self.num_groups * ds
        self.conv_dim = self.d_inner + 2 * bc
        z, x, dt = split_part("z", d_inner), split_part("x", d_inner), split_part("dt", nh)
        B, C = grouped_part("B", ng * ds, ng), grouped_part("C", ng * ds, ng)
        self.in_proj = column_linear(mcfg, d_model, [z, x, B, C, dt], bias=cfg.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.d_conv))
        set_spec(self.conv_weight, 0, x, B, C)
        if cfg.conv_bias:
            self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
            set_spec(self.conv_bias, 0, x, B, C)
        else:
            self.conv_bias = None
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        heads = split_part("", nh)
        for p in (self.dt_bias, self.A_log, self.D):
            set_spec(p, 0, heads)
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        set_spec(self.norm_weight, 0, split_part("", d_inner))
        self.out_proj = row_linear(mcfg, [split_part("", d_inner)], d_model, bias=cfg.proj_bias)
        cp = state.cp_size()
        if cp > 1:
            # this cp rank's heads and (repeated) groups after the exchange, as local conv channels
            groups, self.cp_groups = context.group_slice(self.num_groups)
            self.cp_heads = self.num_heads // cp
            head0 = state.cp_rank() * self.cp_heads
            x_rows = torch.arange(head0 * cfg.head_dim, (head0 + self.cp_heads) * cfg.head_dim)
            bc_rows = torch.cat([torch.arange(g * ds, (g + 1) * ds) for g in groups])
            rows = torch.cat([x_rows, self.d_inner + bc_rows, self.d_inner + bc + bc_rows])
            self.register_buffer("cp_conv_rows", rows, persistent=False)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        if state.cp_size() > 1:
            return self.forward_context_parallel(hidden, seq_idx)
        zxbcdt, _ = self.in_proj(hidden)  # (seqlen, batch, local in_proj)
        zxbcdt = zxbcdt.transpose(0, 1).contiguous()
        if not self.norm_spans_ranks:  # the local packed layout is the single-process one: one fused node
            out, _ = self.out_proj(mixer_core(self, zxbcdt, seq_idx).transpose(0, 1))
            return out
        batch, seqlen, _ = zxbcdt.shape
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        conv_source = (xBC, self.conv_weight, self.conv_bias, "silu") if self.recompute_conv else None
        xBC = causal_conv1d(xBC, self.conv_weight, self.conv_bias, seq_idx=seq_idx, activation="silu")
        bc = self.num_groups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, bc, bc], dim=-1)
        y = ssd_scan(
            x.reshape(batch, seqlen, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(batch, seqlen, self.num_groups, self.d_state),
            C.reshape(batch, seqlen, self.num_groups, self.d_state),
            chunk_size=self.cfg.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            dt_limit=(self.cfg.dt_limit_min, self.cfg.dt_limit_max), seq_idx=seq_idx, conv_source=conv_source,
            recompute_states=self.recompute_states,
        ).reshape(batch, seqlen, self.d_inner)
        return self.gated_norm_out(y, z)

    def gated_norm_out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (batch, seqlen, local d_inner) -> out_proj(norm(y * silu(z))) (seqlen, batch, d_model)."""
        if self.norm_spans_ranks:
            y = self.norm_across_ranks(y, z)
        else:
            y = rmsnorm_gated(y, z, self.norm_weight, group_size=self.group_size, eps=self.norm_eps,
                              norm_before_gate=self.cfg.norm_before_gate)
        out, _ = self.out_proj(y.transpose(0, 1))
        return out

    def forward_context_parallel(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """hidden (s/cp[/tp], batch, d_model) -> the same; the conv and scan see whole sequences."""
        cp = state.cp_size()
        zxbcdt, _ = self.in_proj(hidden)  # (s/cp, batch, local in_proj)
        s_local, batch, _ = zxbcdt.shape
        bc = self.num_groups * self.d_state
        z, x, B, C, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner, bc, bc, self.num_heads], dim=-1)
        B = context.repeat_groups(B, self.num_groups, -1)
        C = context.repeat_groups(C, self.num_groups, -1)
        # one exchange: per destination rank its heads of x and dt and its groups of B and C
        send = torch.cat([t.reshape(s_local, batch, cp, -1) for t in (x, B, C, dt)], dim=-1)
        recv = context.seq_to_heads(send).squeeze(2).transpose(0, 1)  # (batch, s, per-rank channels)
        seqlen = recv.shape[1]
        x_dim, bc_dim = self.cp_heads * self.head_dim, self.cp_groups * self.d_state
        xBC, dt = torch.split(recv, [x_dim + 2 * bc_dim, self.cp_heads], dim=-1)
        conv_bias = None if self.conv_bias is None else self.conv_bias.index_select(0, self.cp_conv_rows)
        conv_in, conv_weight = xBC.contiguous(), self.conv_weight.index_select(0, self.cp_conv_rows)
        conv_source = (conv_in, conv_weight, conv_bias, "silu") if self.recompute_conv else None
        xBC = causal_conv1d(conv_in, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
        x, B, C = torch.split(xBC, [x_dim, bc_dim, bc_dim], dim=-1)
        head0 = state.cp_rank() * self.cp_heads
        heads = slice(head0, head0 + self.cp_heads)
        y = ssd_scan(
            x.reshape(batch, seqlen, self.cp_heads, self.head_dim), dt.contiguous(),
            -torch.exp(self.A_log[heads].float()),
            B.reshape(batch, seqlen, self.cp_groups, self.d_state),
            C.reshape(batch, seqlen, self.cp_groups, self.d_state),
            chunk_size=self.cfg.chunk_size, D=self.D[heads], dt_bias=self.dt_bias[heads], dt_softplus=True,
            dt_limit=(self.cfg.dt_limit_min, self.cfg.dt_limit_max), seq_idx=seq_idx, conv_source=conv_source,
            recompute_states=self.recompute_states,
        )  # (batch, s, heads/cp, head_dim)
        y = context.heads_to_seq(y.transpose(0, 1).reshape(seqlen, batch, 1, x_dim))  # (s/cp, batch, cp, x_dim)
        y = y.reshape(s_local, batch, self.d_inner).transpose(0, 1).contiguous()
        return self.gated_norm_out(y, z.transpose(0, 1).contiguous())

    def norm_across_ranks(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm whose group (of group_size channels) spans tp / ngroups ranks: the sum of
        squares of this rank's channels is summed over the ranks of its group."""
        cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
        v = y.to(cdt)
        gate = F.silu(z.to(cdt))
        if not self.cfg.norm_before_gate:
            v = v * gate
        group = state.tp_rank() * self.global_groups // state.tp_size()
        local_sq = v.pow(2).sum(-1, keepdim=True)  # (batch, seqlen, 1)
        slots = torch.zeros(*local_sq.shape[:-1], self.global_groups, dtype=cdt, device=v.device)
        slots = slots.index_add(-1, torch.tensor([group], device=v.device), local_sq)
        total = all_reduce_tp_both(slots).narrow(-1, group, 1)
        out = v * torch.rsqrt(total / self.group_size + self.norm_eps) * self.norm_weight.to(cdt)
        if self.cfg.norm_before_gate:
            out = out * gate
        return out.to(y.dtype)
