"""Pure-PyTorch Mamba-2 mixer core between in_proj and out_proj: the spec for kernels.mamba_inner.

Owns `mamba_inner`, the layout of the packed projection (`MambaDims`, `split_packed`, `split_xbc`)
that every implementation and the mixer share.

Shapes: zxbcdt (batch, seqlen, 2*d_inner + 2*ngroups*dstate + nheads), packed
[z (d_inner) | x (d_inner) | B (ngroups*dstate) | C (ngroups*dstate) | dt (nheads)] (Nemotron-H's
in_proj layout), d_inner = nheads*headdim; conv_weight (conv_dim, width), conv_bias (conv_dim,),
conv_dim = d_inner + 2*ngroups*dstate; dt_bias, A, D (nheads,); norm_weight (d_inner,);
seq_idx (batch, seqlen) int32. Output (batch, seqlen, d_inner) in zxbcdt's dtype:

    xbc = silu(causal_conv1d(x|B|C, conv_weight, conv_bias))       (kernels.conv1d)
    y   = ssd_scan(x, dt, A, B, C, D skip, softplus(dt + dt_bias) clamped to dt_limit)  (kernels.ssd)
    out = grouped gated RMSNorm(y, z, norm_weight), group_size = d_inner / ngroups   (kernels.rmsnorm_gated)
"""
from __future__ import annotations

from typing import NamedTuple

from kernels.conv1d.reference import causal_conv1d
from kernels.rmsnorm_gated.reference import rmsnorm_gated
from kernels.ssd.reference import ssd_scan


class MambaDims(NamedTuple):
    nheads: int
    headdim: int
    ngroups: int
    dstate: int

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.dstate

    @property
    def packed_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.nheads


def split_packed(zxbcdt, dims: MambaDims):
    """zxbcdt -> views z (b, l, d_inner), xBC (b, l, conv_dim), dt (b, l, nheads)."""
    if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != dims.packed_dim:
        raise ValueError(f"zxbcdt must be (batch, seqlen, 2*d_inner + 2*ngroups*dstate + nheads) = (..., "
                         f"{dims.packed_dim}) for {dims}, got {tuple(zxbcdt.shape)}")
    return zxbcdt.split([dims.d_inner, dims.conv_dim, dims.nheads], dim=-1)


def split_xbc(xbc, dims: MambaDims):
    """xbc (b, l, conv_dim) -> views x (b, l, nheads, headdim), B and C (b, l, ngroups, dstate)."""
    batch, seqlen = xbc.shape[:2]
    gn = dims.ngroups * dims.dstate
    x, B, C = xbc.split([dims.d_inner, gn, gn], dim=-1)
    return (x.view(batch, seqlen, dims.nheads, dims.headdim), B.view(batch, seqlen, dims.ngroups, dims.dstate),
            C.view(batch, seqlen, dims.ngroups, dims.dstate))


def mamba_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, dims: MambaDims, chunk_size,
                dt_limit=(0.0, float("inf")), norm_eps=1e-5, norm_before_gate=False, seq_idx=None, return_y=False):
    """See the module docstring. return_y: -> (out, y) as in kernels.mamba_inner.op."""
    z, xBC, dt = split_packed(zxbcdt, dims)
    xbc = causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
    x, B, C = split_xbc(xbc, dims)
    y = ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit,
                 seq_idx=seq_idx)
    y = y.reshape(z.shape)
    out = rmsnorm_gated(y, z, norm_weight, group_size=dims.d_inner // dims.ngroups, eps=norm_eps,
                        norm_before_gate=norm_before_gate)
    return (out, y.detach()) if return_y else out
