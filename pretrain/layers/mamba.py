"""The Mamba-2 mixer (Mamba-2 paper / Nemotron-H semantics), single process.

Order: in_proj -> z, x, B, C, dt; causal depthwise conv1d (+bias) + SiLU over (x, B, C);
dt = softplus(dt + dt_bias) clamped to dt_limit; A = -exp(A_log); SSD scan with D skip;
grouped gated RMSNorm norm(y * silu(z)); out_proj. Everything between in_proj and out_proj is
kernels.mamba_inner (on the Triton path one autograd node that writes in_proj's output gradient in
one buffer). With the `mamba_norm` recomputation
(trainer.recompute) the normed tensor is not kept for out_proj's backward but recomputed there from
the SSD output and z, which the core keeps anyway (pretrain.recompute.linear_of_rerun);
with `mamba_conv` the SSD scan keeps the conv's input instead of its output (kernels.ssd conv_source);
with `mamba_states` it keeps neither its CB matrices nor its chunk states but reruns their kernels.

Parameter layout follows Nemotron-H so that exports need no reshuffling beyond the conv weight:
in_proj packs [z (d_inner), x (d_inner), B (ngroups*dstate), C (ngroups*dstate), dt (nheads)].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.mamba_inner.op import MambaDims, mamba_inner, split_packed
from kernels.rmsnorm_gated.op import rmsnorm_gated
from pretrain.config import MambaConfig
from pretrain.layers.linear import Linear
from pretrain.recompute import linear_of_rerun


def init_dt_bias(num_heads: int, dt_min: float, dt_max: float, dt_floor: float) -> torch.Tensor:
    """dt drawn log-uniformly in [dt_min, dt_max], stored as its inverse softplus (the paper's init)."""
    dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


def mixer_core(mixer: nn.Module, zxbcdt: torch.Tensor, seq_idx: torch.Tensor | None, return_y: bool = False):
    """kernels.mamba_inner over a mixer's packed projection (batch, seqlen, packed) with its
    parameters, sizes (`dims`) and recompute parts: this mixer's and the tensor-parallel one's
    (parallel/mamba.py, with its local sizes)."""
    cfg = mixer.cfg
    return mamba_inner(zxbcdt, mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, -torch.exp(mixer.A_log.float()),
                       mixer.D, mixer.norm_weight, dims=mixer.dims, chunk_size=cfg.chunk_size,
                       dt_limit=(cfg.dt_limit_min, cfg.dt_limit_max), norm_eps=mixer.norm_eps,
                       norm_before_gate=cfg.norm_before_gate, seq_idx=seq_idx, recompute_conv=mixer.recompute_conv,
                       recompute_states=mixer.recompute_states, return_y=return_y)


class Mamba2Mixer(nn.Module):
    """Input/output (batch, seqlen, d_model); seq_idx (batch, seqlen) int32 resets state per document."""

    recompute_norm = False  # set by pretrain.recompute.apply_policy (trainer.recompute includes mamba_norm)
    recompute_conv = False  # likewise for mamba_conv
    recompute_states = False  # likewise for mamba_states

    def __init__(self, d_model: int, cfg: MambaConfig, *, norm_eps: float):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.num_groups, self.d_state = cfg.num_groups, cfg.d_state
        self.dims = MambaDims(cfg.num_heads, cfg.head_dim, cfg.num_groups, cfg.d_state)
        self.d_inner, self.conv_dim = self.dims.d_inner, self.dims.conv_dim
        self.norm_eps = norm_eps
        self.in_proj = Linear(d_model, self.dims.packed_dim, bias=cfg.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim)) if cfg.conv_bias else None
        self.dt_bias = nn.Parameter(init_dt_bias(cfg.num_heads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        A = torch.empty(cfg.num_heads).uniform_(cfg.A_init_min, cfg.A_init_max)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(cfg.num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = Linear(self.d_inner, d_model, bias=cfg.proj_bias)
        # nn.Conv1d's default init for a depthwise kernel: U(-1/sqrt(width), 1/sqrt(width))
        bound = 1.0 / math.sqrt(cfg.d_conv)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if self.conv_bias is not None:
            nn.init.uniform_(self.conv_bias, -bound, bound)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        zxbcdt = self.in_proj(hidden)
        if self.recompute_norm and torch.is_grad_enabled():
            # out_proj's backward reruns the norm from what the core keeps anyway
            normed, y = mixer_core(self, zxbcdt, seq_idx, return_y=True)
            z = split_packed(zxbcdt, self.dims)[0]
            return linear_of_rerun(normed, self._gated_norm, (y, z.detach(), self.norm_weight.detach()),
                                   self.out_proj)
        return self.out_proj(mixer_core(self, zxbcdt, seq_idx))

    def _gated_norm(self, y, z, weight):
        return rmsnorm_gated(y, z, weight, group_size=self.d_inner // self.num_groups, eps=self.norm_eps,
                             norm_before_gate=self.cfg.norm_before_gate)
