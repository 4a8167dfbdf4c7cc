"""Pure-PyTorch SSD (Mamba-2 state-space duality) scan: the spec for the Triton kernels.

Owns `ssd_scan` (the chunked block decomposition of the Mamba-2 paper, vectorised, autograd
differentiable: the CPU training path and the backward reference), `ssd_scan_sequential` (the
naive per-timestep recurrence, the test oracle) and `process_dt` (bias, softplus, clamp).

Shapes (paper names):
  x  (batch, seqlen, nheads, headdim)      dt (batch, seqlen, nheads)      A (nheads,) negative
  B, C (batch, seqlen, ngroups, dstate)    head h reads group h // (nheads // ngroups)
  D  (nheads,) or (nheads, headdim)        z like x                         dt_bias (nheads,)
  seq_idx (batch, seqlen) int document index, non-decreasing along each row
  initial_states / final states (batch, nheads, headdim, dstate)

Semantics, per head:  dt <- clamp(softplus(dt + dt_bias))
  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T      (h: headdim x dstate)
  y_t = h_t C_t + D x_t ;  y <- y * silu(z)
The state is zero at each document start (seq_idx changes); initial_states is the state before
position 0 and reaches only the document at position 0. Computation is float32 (float64 when x
is float64, for tests); y has x's dtype, final states the compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def process_dt(dt, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")), dtype=torch.float32):
    """dt (batch, seqlen, nheads) -> clamp(softplus(dt + dt_bias), *dt_limit) in `dtype`."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _check_shapes(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must be (batch, seqlen, nheads)={(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be (nheads,)=({nheads},), got {tuple(A.shape)}")
    if B.shape != (batch, seqlen, ngroups, dstate) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}, {tuple(C.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must be (nheads,) or (nheads, headdim), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be (nheads,), got {tuple(dt_bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be (batch, seqlen), got {tuple(seq_idx.shape)}")
    if initial_states is not None and initial_states.shape != (batch, nheads, headdim, dstate):
        raise ValueError(
            f"initial_states must be (batch, nheads, headdim, dstate)={(batch, nheads, headdim, dstate)}, "
            f"got {tuple(initial_states.shape)}"
        )


def _finish(y, x, D, z, cdt):
    """y (b, l, h, p) in compute dtype: add the D skip, gate with silu(z), cast to x's dtype."""
    if D is not None:
        Dc = D.to(cdt)
        y = y + x.to(cdt) * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)


def ssd_scan(
    x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), seq_idx=None, initial_states=None, return_final_states=False,
):
    """Chunked SSD scan (Mamba-2 paper, block decomposition). See the module docstring.

    Returns y (batch, seqlen, nheads, headdim) in x's dtype, and with return_final_states also
    the state after the last position (batch, nheads, headdim, dstate) in the compute dtype.
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states)
    cdt = _compute_dtype(x)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    Q = int(chunk_size)
    nchunks = max(1, math.ceil(seqlen / Q))
    pad = nchunks * Q - seqlen

    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, l, h)
    xc, Bc, Cc = x.to(cdt), B.to(cdt), C.to(cdt)
    if pad:
        # dt = 0 past the end: no decay, no input, so the final state is unchanged.
        dtp = F.pad(dtp, (0, 0, 0, pad))
        xc = F.pad(xc, (0, 0, 0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
    L = nchunks * Q
    # chunked views: x (b, c, Q, g, r, p); B, C (b, c, Q, g, n); dt (b, g, r, c, Q)
    xc = xc.reshape(batch, nchunks, Q, ngroups, rep, headdim)
    Bc = Bc.reshape(batch, nchunks, Q, ngroups, dstate)
    Cc = Cc.reshape(batch, nchunks, Q, ngroups, dstate)
    dtc = dtp.reshape(batch, nchunks, Q, ngroups, rep).permute(0, 3, 4, 1, 2)
    dA = dtc * A.to(cdt).reshape(ngroups, rep)[None, :, :, None, None]
    dA_cs = torch.cumsum(dA, dim=-1)  # (b, g, r, c, Q)

    if seq_idx is not None:
        si = seq_idx.to(torch.int64)
        if pad:
            si = torch.cat([si, si[:, -1:].expand(batch, pad)], dim=1)
        si = si.reshape(batch, nchunks, Q)
        si_end = si[:, :, -1]  # (b, c): document at each chunk's last position
        si_before = torch.cat([si[:, :1, 0], si_end[:, :-1]], dim=1)  # doc of the state entering chunk
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()

    # 1. diagonal blocks: y_i = sum_{j<=i} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j
    seg = dA_cs[..., :, None] - dA_cs[..., None, :]  # (b, g, r, c, Q, Q)
    mask = causal
    if seq_idx is not None:
        same = si[:, :, :, None] == si[:, :, None, :]  # (b, c, Q, Q)
        mask = (mask & same)[:, None, None]
    decay = torch.exp(seg.masked_fill(~mask, -math.inf))
    CB = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)  # (b, g, c, Q, Q)
    xdt = xc * dtc.permute(0, 3, 4, 1, 2)[..., None]  # (b, c, Q, g, r, p): dt_j x_j
    y_diag = torch.einsum("bgrcij,bcjgrp->bcigrp", CB[:, :, None] * decay, xdt)

    # 2. state of each chunk from its own inputs (only the document at the chunk end counts)
    decay_states = torch.exp(dA_cs[..., -1:] - dA_cs)  # (b, g, r, c, Q)
    if seq_idx is not None:
        decay_states = decay_states * (si == si_end[:, :, None]).to(cdt)[:, None, None]
    states = torch.einsum("bgrcj,bcjgn,bcjgrp->bcgrpn", decay_states, Bc, xdt)

    # 3. pass states between chunks: S_c = sum_{k<=c} exp(sum_{k<m<=c} A_m) S_k (same document)
    if initial_states is None:
        init = torch.zeros(batch, 1, ngroups, rep, headdim, dstate, dtype=cdt, device=x.device)
    else:
        init = initial_states.to(cdt).reshape(batch, 1, ngroups, rep, headdim, dstate)
    states = torch.cat([init, states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = F.pad(dA_cs[..., -1], (1, 0))  # (b, g, r, c+1)
    ccs = torch.cumsum(chunk_decay, dim=-1)
    cseg = ccs[..., :, None] - ccs[..., None, :]
    cmask = torch.ones(nchunks + 1, nchunks + 1, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        si_ends = torch.cat([si[:, :1, 0], si_end], dim=1)  # (b, c+1): doc of each state
        cmask = (cmask & (si_ends[:, :, None] == si_ends[:, None, :]))[:, None, None]
    cdecay = torch.exp(torch.where(cmask, cseg, torch.full_like(cseg, -math.inf)))
    passed = torch.einsum("bgrzc,bcgrpn->bzgrpn", cdecay, states)  # (b, c+1, g, r, p, n)
    prev_states, final_states = passed[:, :-1], passed[:, -1]

    # 4. off-diagonal blocks: the state entering the chunk, decayed to position i, read by C_i
    out_decay = torch.exp(dA_cs)  # (b, g, r, c, Q)
    if seq_idx is not None:
        out_decay = out_decay * (si == si_before[:, :, None]).to(cdt)[:, None, None]
    y_off = torch.einsum("bcign,bcgrpn,bgrci->bcigrp", Cc, prev_states, out_decay)

    y = (y_diag + y_off).reshape(batch, L, nheads, headdim)[:, :seqlen]
    y = _finish(y, x, D, z, cdt)
    if return_final_states:
        return y, final_states.reshape(batch, nheads, headdim, dstate)
    return y


def ssd_scan_sequential(
    x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), seq_idx=None, initial_states=None, return_final_states=False,
):
    """The naive per-timestep recurrence (test oracle); same signature and results as ssd_scan.

    chunk_size is accepted and ignored. Slow: a Python loop over seqlen.
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, seq_idx, initial_states)
    cdt = _compute_dtype(x)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Bh = B.to(cdt).repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.to(cdt).repeat_interleave(rep, dim=2)
    xc, Ac = x.to(cdt), A.to(cdt)
    if initial_states is None:
        h = torch.zeros(batch, nheads, headdim, dstate, dtype=cdt, device=x.device)
    else:
        h = initial_states.to(cdt)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
            h = h * keep
        dA = torch.exp(dtp[:, t] * Ac)  # (b, h)
        h = h * dA[:, :, None, None] + (dtp[:, t, :, None] * xc[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    y = _finish(y, x, D, z, cdt)
    if return_final_states:
        return y, h
    return y
