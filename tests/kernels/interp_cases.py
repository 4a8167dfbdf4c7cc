"""Run the Triton kernels under TRITON_INTERPRET=1 against the references; print JSON errors.

Executed in a subprocess by test_kern_triton_interp.py (the interpreter must be switched on
before Triton kernels are defined, and must not leak into other tests' process). Each case
prints {case: {tensor: relative error}}; fresh random inputs every run.
"""

import json
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_kern_ssd_reference import make_inputs, rel  # noqa: E402

import kernels  # noqa: E402
from kernels.conv1d.reference import causal_conv1d as conv_ref  # noqa: E402
from kernels.rmsnorm_gated.reference import rmsnorm_gated as rms_ref  # noqa: E402
from kernels.ssd.reference import ssd_scan as ssd_ref  # noqa: E402
from kernels.ssd.reference import ssd_scan_sequential  # noqa: E402


def run_ssd(name, shape, chunk, **kw):
    t, opt = make_inputs(dtype=torch.float32, grad=True, **shape, **{k: v for k, v in kw.items()
                                                                      if k in ("D_shape", "with_z", "with_bias",
                                                                               "with_init", "with_seq")})
    softplus = kw.get("softplus", True)
    with torch.no_grad():
        if not softplus:
            t["dt"].copy_(t["dt"].abs() * 0.3)
        # steeper decays (SSD_CASES' ssd_steep: cs falls by thousands within a chunk)
        t["A"].mul_(kw.get("a_scale", 1.0))
        t["dt"].add_(kw.get("dt_shift", 0.0))
    leaves = {**t, **{k: v for k, v in opt.items() if k != "seq_idx"}}
    args = dict(chunk_size=chunk, dt_limit=kw.get("limit", (0.0, math.inf)), dt_softplus=softplus,
                return_final_states=True)
    assert kernels.use_triton(t["x"]), "the interpreter run must dispatch to Triton"
    y, fs = kernels.ssd_scan(**t, **opt, **args)
    seeds = (torch.randn_like(y), torch.randn_like(fs))
    g = torch.autograd.grad((y * seeds[0]).sum() + (fs * seeds[1]).sum(), list(leaves.values()))
    y0, fs0 = ssd_ref(**t, **opt, **args)
    g0 = torch.autograd.grad((y0 * seeds[0]).sum() + (fs0 * seeds[1]).sum(), list(leaves.values()))
    res = {"y": rel(y, y0), "final_states": rel(fs, fs0)}
    res.update({f"d{k}": rel(a, b) for k, a, b in zip(leaves, g, g0) if f"d{k}" not in kw.get("skip", ())})
    # and the naive recurrence in float64 (forward)
    t64 = {k: v.detach().double() for k, v in t.items()}
    o64 = {k: (v.detach().double() if v.is_floating_point() else v) for k, v in opt.items()}
    y64, fs64 = ssd_scan_sequential(**t64, **o64, **args)
    res["y_vs_sequential"] = rel(y.double(), y64)
    res["final_vs_sequential"] = rel(fs.double(), fs64)
    return name, res


def run_conv_ssd_source(name, batch=2, seqlen=45, nheads=4, hdim=8, ngroups=2, dstate=8, width=4, chunk=16):
    """conv1d -> SSD as the Mamba mixer runs them, with and without conv_source: the output and every
    gradient must be the same bits (the backward reruns the same conv kernel on the same input), and
    with conv_source the conv's output must not be among the tensors kept for backward."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    d_inner, gn = nheads * hdim, ngroups * dstate
    leaves = {
        "xbc": torch.randn(batch, seqlen, d_inner + 2 * gn, generator=g),
        "weight": torch.randn(d_inner + 2 * gn, width, generator=g) * 0.5,
        "bias": torch.randn(d_inner + 2 * gn, generator=g) * 0.1,
        "dt": torch.randn(batch, seqlen, nheads, generator=g) - 1,
        "A": -torch.rand(nheads, generator=g) - 0.2,
        "D": torch.randn(nheads, generator=g),
        "dt_bias": torch.randn(nheads, generator=g) * 0.1,
    }
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq_idx[0, 13:] = 1
    seq_idx[0, 30:] = 2
    seed = torch.randn(batch, seqlen, nheads, hdim, generator=g)
    runs = []
    for use_source in (False, True):
        kept = []

        def pack(t):
            kept.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            xbc = kernels.causal_conv1d(leaves["xbc"], leaves["weight"], leaves["bias"], seq_idx=seq_idx,
                                        activation="silu")
            x, B, C = torch.split(xbc, [d_inner, gn, gn], dim=-1)
            source = (leaves["xbc"], leaves["weight"], leaves["bias"], "silu") if use_source else None
            y = kernels.ssd_scan(x.reshape(batch, seqlen, nheads, hdim), leaves["dt"], leaves["A"],
                                 B.reshape(batch, seqlen, ngroups, dstate), C.reshape(batch, seqlen, ngroups, dstate),
                                 chunk_size=chunk, D=leaves["D"], dt_bias=leaves["dt_bias"], seq_idx=seq_idx,
                                 conv_source=source)
        grads = torch.autograd.grad((y * seed).sum(), list(leaves.values()))
        runs.append((y, grads, float(xbc.untyped_storage().data_ptr() in kept)))
    (y0, g0, kept0), (y1, g1, kept1) = runs
    res = {"y": float((y1 - y0).abs().max()), "conv_output_kept_without": kept0, "conv_output_kept_with": kept1}
    res.update({f"d{k}": float((a - b).abs().max()) for k, a, b in zip(leaves, g1, g0)})
    return name, res


def run_mamba_inner(name, norm_before_gate, recompute_conv, recompute_states, batch=2, seqlen=45, nheads=4, hdim=8,
                    ngroups=2, dstate=8, width=4, chunk=16):
    """The fused mixer core (kernels.mamba_inner: one node whose backward writes every gradient into
    slices of one buffer) against the same Triton kernels as separate ops (conv, SSD, norm on views of
    the packed projection; autograd cats the gradients): the same bits, output and every gradient
    (max |difference|, "bits_*"); and against the PyTorch reference (relative errors). Documents cut
    inside chunks, two groups, odd seqlen; "kept_conv_output" says whether a tensor of the conv output's
    shape is among those kept for the backward. "bits_padded_*": the same op on a projection whose rows
    are padded past its width (a column slice of a wider tensor: the layout torch.compile may hand the
    op, which takes any strides in the usual order) gives the same bits."""
    from kernels.mamba_inner import reference as inner_ref
    from kernels.mamba_inner.op import MambaDims, mamba_inner
    from bench.mamba_core import separate_ops

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    dims = MambaDims(nheads, hdim, ngroups, dstate)
    leaves = {
        "zxbcdt": torch.randn(batch, seqlen, dims.packed_dim, generator=g),
        "conv_weight": torch.randn(dims.conv_dim, width, generator=g) * 0.5,
        "conv_bias": torch.randn(dims.conv_dim, generator=g) * 0.1,
        "dt_bias": torch.randn(nheads, generator=g) * 0.1,
        "A": -torch.rand(nheads, generator=g) - 0.2,
        "D": torch.randn(nheads, generator=g),
        "norm_weight": 1 + 0.1 * torch.randn(dims.d_inner, generator=g),
    }
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq_idx[0, 13:] = 1
    seq_idx[0, 30:] = 2
    kw = dict(dims=dims, chunk_size=chunk, dt_limit=(0.01, 3.0), norm_eps=1e-5, norm_before_gate=norm_before_gate,
              seq_idx=seq_idx)
    hints = dict(recompute_conv=recompute_conv, recompute_states=recompute_states)
    seed = torch.randn(batch, seqlen, dims.d_inner, generator=g)
    args = list(leaves.values())
    kept = set()

    def pack(t):
        kept.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mamba_inner(*args, **kw, **hints)
    grads = torch.autograd.grad((out * seed).sum(), args)
    out_sep = separate_ops(*args, **kw, **hints)
    grads_sep = torch.autograd.grad((out_sep * seed).sum(), args)
    out_ref = inner_ref.mamba_inner(*args, **kw)
    grads_ref = torch.autograd.grad((out_ref * seed).sum(), args)
    wide = torch.randn(batch, seqlen, dims.packed_dim + 7, generator=g)
    wide[..., :dims.packed_dim] = leaves["zxbcdt"].detach()
    padded = wide[..., :dims.packed_dim].requires_grad_(True)
    out_pad = mamba_inner(padded, *args[1:], **kw, **hints)
    grads_pad = torch.autograd.grad((out_pad * seed).sum(), [padded, *args[1:]])
    res = {"bits_out": float((out - out_sep).detach().abs().max()), "out": rel(out, out_ref),
           "kept_conv_output": float((batch, seqlen, dims.conv_dim) in kept),
           "bits_padded_out": float((out - out_pad).detach().abs().max()),
           "bits_padded_grads": max(float((a - b).abs().max()) for a, b in zip(grads, grads_pad))}
    for k, a, b, r in zip(leaves, grads, grads_sep, grads_ref):
        res[f"bits_d{k}"] = float((a - b).abs().max())
        res[f"d{k}"] = rel(a, r)
    return name, res


def run_ssd_recompute_states(name, batch=2, seqlen=45, nheads=4, hdim=5, ngroups=2, dstate=6, chunk=16):
    """The SSD scan with and without recompute_states (seq_idx, initial states, z, final states):
    the output and every gradient must be the same bits (the backward reruns the forward's kernels on
    the same inputs), and with it neither the float32 chunk states nor the CB matrices are kept."""
    t, opt = make_inputs(batch, seqlen, nheads, hdim, ngroups, dstate, dtype=torch.float32, grad=True)
    leaves = {**t, **{k: v for k, v in opt.items() if k != "seq_idx"}}
    nchunks = -(-seqlen // chunk)
    states_shape, cb_shape = (batch, nchunks, nheads, hdim, dstate), (batch, nchunks, ngroups, chunk, chunk)
    seeds = None
    runs = []
    for recompute in (False, True):
        kept = set()

        def pack(t):
            kept.add(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, fs = kernels.ssd_scan(**t, **opt, chunk_size=chunk, return_final_states=True,
                                     recompute_states=recompute)
        seeds = seeds or (torch.randn_like(y), torch.randn_like(fs))
        grads = torch.autograd.grad((y * seeds[0]).sum() + (fs * seeds[1]).sum(), list(leaves.values()))
        runs.append((y, fs, grads, float(states_shape in kept), float(cb_shape in kept)))
    (y0, f0, g0, s0, c0), (y1, f1, g1, s1, c1) = runs
    res = {"y": float((y1 - y0).abs().max().detach()), "final_states": float((f1 - f0).abs().max().detach()),
           "states_kept_without": s0, "cb_kept_without": c0, "states_kept_with": s1, "cb_kept_with": c1}
    res.update({f"d{k}": float((a - b).abs().max()) for k, a, b in zip(leaves, g1, g0)})
    return name, res


def state_pass_inputs(batch, seqlen, h, p, g, n, q, dtype, cuts):
    """x, B (dtype), seq_idx (row r's documents start at cuts[r]), float32 initial states and
    dt_cumsum's dtp, cs (chunk q): what the chunk-states and state-passing cases take."""
    from kernels.ssd import triton_fwd as fwd

    x = torch.randn(batch, seqlen, h, p).to(dtype)
    dt = torch.randn(batch, seqlen, h) - 1
    A = -torch.exp(torch.rand(h) * 2 - 1)
    B = torch.randn(batch, seqlen, g, n).to(dtype)
    seq = torch.zeros(batch, seqlen, dtype=torch.int32)
    for row, starts in enumerate(cuts):
        for t in starts:
            seq[row, t:] += 1
    init = torch.randn(batch, h, p, n)
    dtp, cs = fwd.dt_cumsum(dt, None, A, q, True, (0.0, math.inf))
    return x, B, seq, init, dtp, cs


def run_ssd_states_lp_only(name, batch=2, seqlen=70, h=4, p=24, g=2, n=40, q=16):
    """Chunk states + state passing for float16 x with store_f32=False (a forward whose backward
    will not read the float32 prev) against store_f32=True: prev_lp and the final state the same
    bits, prev not written; for float32 x prev_lp is prev itself (no second copy) and None without
    store_lp; and the SSD op's no-grad forward (which keeps nothing for a backward) against its
    grad-mode forward: the same output and final state bits."""
    from kernels.ssd import triton_states as states

    prec = "ieee"
    x, B, seq, init, dtp, cs = state_pass_inputs(batch, seqlen, h, p, g, n, q, torch.float16, ((21,), ()))
    full = states.states_and_pass(x, B, dtp, cs, seq, init, q, prec)
    lp_only = states.states_and_pass(x, B, dtp, cs, seq, init, q, prec, store_f32=False)
    res = {"prev_none": float(lp_only[0] is None and full[0] is not None),
           "bits_prev_lp": float(torch.equal(full[1], lp_only[1]) and full[1].dtype == torch.float16),
           "bits_final": float(torch.equal(full[2], lp_only[2]))}
    x32, B32 = x.float(), B.float()
    a = states.states_and_pass(x32, B32, dtp, cs, seq, init, q, prec)
    b = states.states_and_pass(x32, B32, dtp, cs, seq, init, q, prec, store_lp=False)
    res["float32_lp_is_prev"] = float(a[1] is a[0] and b[1] is None and torch.equal(a[0], b[0]))
    try:
        states.state_pass(torch.zeros(1, 2, h, p, n), cs, None, None, seqlen, q, torch.float32, store_f32=False)
        res["lp_only_needs_lp_dtype"] = 0.0
    except ValueError:
        res["lp_only_needs_lp_dtype"] = 1.0
    t, opt = make_inputs(2, 45, 4, 5, 2, 6, dtype=torch.float32, grad=True)
    y1, f1 = kernels.ssd_scan(**t, **opt, chunk_size=16, return_final_states=True)
    with torch.no_grad():
        y0, f0 = kernels.ssd_scan(**t, **opt, chunk_size=16, return_final_states=True)
    res["no_grad_bits"] = float(torch.equal(y0, y1.detach()) and torch.equal(f0, f1.detach()))
    return name, res


def run_ssd_cb_structure(name, batch=2, seqlen=45, g=2, n=8, q=32):
    """compute_cb against C_i . B_j per chunk with the causal and document zeros (documents cut
    inside chunks, the last chunk partial): every element of the (Q, Q) blocks, the upper ones too
    (consumers multiply by CB instead of masking, with tiles that may reach into them on a GPU)."""
    from kernels.ssd import triton_fwd as fwd

    B, C = torch.randn(batch, seqlen, g, n), torch.randn(batch, seqlen, g, n)
    seq = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq[0, 9:] += 1
    seq[0, 40:] += 1
    seq[1, 33:] += 1
    cb = fwd.compute_cb(C, B, seq, q, "ieee")
    nchunks = -(-seqlen // q)
    pad = nchunks * q - seqlen
    Bp, Cp = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C))
    sp = torch.nn.functional.pad(seq, (0, pad), value=-1).reshape(batch, nchunks, q)
    ref = torch.einsum("bcign,bcjgn->bcgij", Cp.reshape(batch, nchunks, q, g, n), Bp.reshape(batch, nchunks, q, g, n))
    keep = torch.ones(q, q, dtype=torch.bool).tril() & (sp[:, :, :, None] == sp[:, :, None, :])
    ref = ref * keep[:, :, None]
    valid = torch.arange(nchunks * q).reshape(nchunks, q) < seqlen  # padding rows/columns: not compared
    v = (valid[:, :, None] & valid[:, None, :])[None, :, None]
    return name, {"rel": rel(cb[v.expand_as(cb)], ref[v.expand_as(ref)]),
                  "zeros_exact": float(bool((cb[(~keep[:, :, None]).expand_as(cb) & v.expand_as(cb)] == 0).all()))}


def run_conv(name, width, act, batch=2, seqlen=37, dim=24, cuts=((5, 6, 20), (31,)), bias=True, strided=False):
    """cuts[row]: positions where a new document starts (None: no seq_idx). strided: x is a
    (batch, dim, seqlen) tensor transposed and the output gradient a (seqlen, batch, dim) one."""
    if strided:
        x = torch.randn(batch, dim, seqlen).transpose(1, 2).requires_grad_(True)
    else:
        x = torch.randn(batch, seqlen, dim, requires_grad=True)
    w = torch.randn(dim, width, requires_grad=True)
    b = torch.randn(dim, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    seq = None
    if cuts is not None:
        seq = torch.zeros(batch, seqlen, dtype=torch.int32)
        for row, row_cuts in enumerate(cuts):
            for c in row_cuts:
                seq[row, c:] += 1
    y = kernels.causal_conv1d(x, w, b, seq_idx=seq, activation=act)
    gy = torch.randn(seqlen, batch, dim).transpose(0, 1) if strided else torch.randn_like(y)
    g = torch.autograd.grad(y, leaves, grad_outputs=gy)
    y0 = conv_ref(x, w, b, seq_idx=seq, activation=act)
    g0 = torch.autograd.grad(y0, leaves, grad_outputs=gy)
    res = {"y": rel(y, y0)}
    res.update({k: rel(a, c) for k, a, c in zip(("dx", "dweight", "dbias"), g, g0)})
    return name, res


def run_rms(name, group_size, before, with_z):
    y = torch.randn(3, 7, 48, requires_grad=True)
    z = torch.randn(3, 7, 48, requires_grad=True) if with_z else None
    w = (1 + 0.1 * torch.randn(48)).requires_grad_(True)
    leaves = [y, w] + ([z] if with_z else [])
    o = kernels.rmsnorm_gated(y, z, w, group_size=group_size, norm_before_gate=before)
    go = torch.randn_like(o)
    g = torch.autograd.grad((o * go).sum(), leaves)
    o0 = rms_ref(y, z, w, group_size=group_size, norm_before_gate=before)
    g0 = torch.autograd.grad((o0 * go).sum(), leaves)
    res = {"y": rel(o, o0)}
    res.update({k: rel(a, c) for k, a, c in zip(("dy", "dweight", "dz"), g, g0)})
    return name, res


def dcb_dbc_inputs(batch, seqlen, h, p, g, n, q, prec):
    """What dCB and dB/dC take, float32, with documents cut inside chunks (row 0 at 9 and 37, row 1
    at 20): x, dy, B, C, seq_idx, dtp, cs, cb, prev (from the forward kernels) and a random dS."""
    from kernels.ssd import triton_fwd as fwd
    from kernels.ssd import triton_states as states

    x, dy = torch.randn(batch, seqlen, h, p), torch.randn(batch, seqlen, h, p)
    dt = torch.randn(batch, seqlen, h) - 1
    A = -torch.exp(torch.rand(h) * 2 - 1)
    B, C = torch.randn(batch, seqlen, g, n), torch.randn(batch, seqlen, g, n)
    seq = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq[0, 9:] += 1
    seq[0, 37:] += 1
    seq[1, 20:] += 1
    dtp, cs = fwd.dt_cumsum(dt, None, A, q, True, (0.0, math.inf))
    cb = fwd.compute_cb(C, B, seq, q, prec)
    prev = states.state_pass(states.chunk_outer(x, B, dtp, cs, seq, q, 0, prec), cs, seq, None, seqlen, q)[0]
    return x, dy, B, C, seq, dtp, cs, cb, prev, torch.randn_like(prev)


def run_ssd_head_pipe(name, batch=2, seqlen=45, h=4, p=24, g=2, n=8, q=16):
    """The dCB and dB/dC kernels with the head loop innermost (HEAD_PIPE, what the SSD cases run in
    the interpreter) against the loop over headdim blocks (16 of p = 24: two blocks, the second
    partial), on the same inputs with documents cut inside chunks: relative differences."""
    from kernels.ssd import triton_bwd as bwd

    prec = "ieee"
    x, dy, B, C, seq, dtp, cs, cb, prev, dS = dcb_dbc_inputs(batch, seqlen, h, p, g, n, q, prec)
    res = {}
    outs = {}
    for pipe in (True, False):
        dcb, rows = bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, head_pipe=pipe)
        dB, dC, offd = bwd.chunk_dbc(x, dy, B, C, prev, dS, dcb, dtp, cs, seq, q, prec, head_pipe=pipe)
        outs[pipe] = dict(dcb=dcb, rows=rows, dB=dB, dC=dC, offd=offd)
    for k in outs[True]:
        res[k] = rel(outs[True][k], outs[False][k])
    return name, res


def run_ssd_nsplit(name, batch=2, seqlen=45, h=8, p=16, g=2, n=8, q=16):
    """dCB and dB/dC with 1, 2 (the interpreter's default) and 4 programs sharing a group's 4 heads,
    documents cut inside chunks: relative differences of the sums over the splits against the
    default's (float32: only the order of the head sums differs)."""
    from kernels.ssd import triton_bwd as bwd

    prec = "ieee"
    x, dy, B, C, seq, dtp, cs, cb, prev, dS = dcb_dbc_inputs(batch, seqlen, h, p, g, n, q, prec)
    outs = {}
    for k in (None, 1, 4):
        dcb, rows = bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, nsplit=k)
        dB, dC, offd = bwd.chunk_dbc(x, dy, B, C, prev, dS, dcb, dtp, cs, seq, q, prec)
        outs[k] = dict(nsplit=float(dcb.shape[2]), dcb=dcb.sum(2), rows=rows, dB=dB, dC=dC, offd=offd)
    res = {}
    for k in (1, 4):
        res[f"nsplit_{k}"] = outs[k]["nsplit"]
        for what in ("dcb", "rows", "dB", "dC", "offd"):
            res[f"{what}_{k}"] = rel(outs[k][what], outs[None][what])
    # the op's entry: with the choice made (choose_structure stubbed: it takes the first candidate
    # here, as a GPU that timed 1 split fastest would), the gradients of that split
    asked = []
    real = bwd.choose_structure
    bwd.choose_structure = lambda name, key, labels, run, default, device: asked.append(labels) or labels[0]
    try:
        dB, dC, rows, offd = bwd.chunk_dcb_dbc(x, dy, B, C, prev, dS, dtp, cs, seq, cb, q, prec)
    finally:
        bwd.choose_structure = real
    res["asked"] = float(asked == [bwd.split_candidates(h // g)] == [(1, 2)])
    for what, v in (("dB", dB), ("dC", dC), ("rows", rows), ("offd", offd)):
        res[f"entry_{what}"] = rel(v, outs[1][what])
    # float16 B and C: with one split the kernel stores dB and dC in float16 itself; with two, torch
    # adds the float32 partial sums and rounds. The two agree within float16's rounding
    half = {}
    for k in (1, 2):
        dcb, _ = bwd.chunk_dcb(x.half(), dy.half(), dtp, cs, seq, cb, g, q, prec, nsplit=k)
        half[k] = bwd.chunk_dbc(x.half(), dy.half(), B.half(), C.half(), prev, dS, dcb, dtp, cs, seq, q, prec)[:2]
    res["half_dtype"] = float(all(t.dtype == torch.float16 and t.is_contiguous() for t in half[1] + half[2]))
    for i, what in enumerate(("dB", "dC")):
        res[f"half_{what}"] = rel(half[1][i].float(), half[2][i].float())
    try:
        bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, nsplit=3)
        res["rejects_3"] = 0.0
    except ValueError:
        res["rejects_3"] = 1.0
    return name, res


def run_ssd_launch_order(name, batch=2, seqlen=45, h=8, p=16, g=2, n=8, q=16):
    """The chunk scan and dx kernels launched chunks-fast (the benchmarks' A/B) against heads-fast
    (the default, what the SSD cases above check against the reference), with groups, documents cut
    inside chunks, D and z: each program computes the same tile either way, so the same bits."""
    from kernels.ssd import triton_bwd_dx as bwd_dx
    from kernels.ssd import triton_fwd as fwd

    prec = "ieee"
    x, dy, B, C, seq, dtp, cs, cb, prev, dS = dcb_dbc_inputs(batch, seqlen, h, p, g, n, q, prec)
    z, D = torch.randn_like(x), torch.randn(h)
    res = {}
    outs = {order: fwd.chunk_scan(cb, x, z, D, C, prev, dtp, cs, seq, q, True, prec, heads_fast=order)
            + bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq, q, prec, heads_fast=order)
            for order in (True, False)}
    for what, a, b in zip(("out", "ypre", "dx", "ddtp", "dcs", "dD"), outs[True], outs[False]):
        res[f"bits_{what}"] = float((a - b).abs().max())
        res[f"nonzero_{what}"] = float(a.abs().max() > 0)
    return name, res


def run_ssd_dcb_split_decay(name, batch=2, seqlen=70, h=4, p=24, g=2, n=8, q=32):
    """The dCB kernel's split decay against its unsplit form (one more rounding: relative
    differences), in both loop structures, with documents cut inside chunks, at ordinary decays and
    at steep ones (A = -20, dt ~ 4: cs falls by ~2600 within a chunk of 32, where exp(-cs_j) alone
    would overflow float32). Chunks of 32 are two tiles of 16 in the interpreter, so one tile lies
    below the diagonal (the split's part); 70 positions make three chunks, the last partial."""
    from kernels.ssd import triton_bwd as bwd
    from kernels.ssd import triton_fwd as fwd

    prec = "ieee"
    res = {}
    for regime, a_scale, dt_shift in (("", 1.0, -1.0), ("steep_", 20.0, 4.0)):
        x, dy = torch.randn(batch, seqlen, h, p), torch.randn(batch, seqlen, h, p)
        dt = torch.randn(batch, seqlen, h) + dt_shift
        A = -a_scale * torch.exp(torch.rand(h) * 2 - 1)
        B, C = torch.randn(batch, seqlen, g, n), torch.randn(batch, seqlen, g, n)
        seq = torch.zeros(batch, seqlen, dtype=torch.int32)
        seq[0, 9:] += 1
        seq[0, 40:] += 1
        seq[1, 20:] += 1
        dtp, cs = fwd.dt_cumsum(dt, None, A, q, True, (0.0, math.inf))
        cb = fwd.compute_cb(C, B, seq, q, prec)
        # dCB is written in the block-lower-triangular 16 x 16 tiles only, which is what consumers read
        blk = torch.arange(q) // 16
        written = blk[None, :] <= blk[:, None]
        for pipe in (True, False):
            dcbs = [bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, head_pipe=pipe, split_decay=sp)
                    for sp in (False, True)]
            for what, a, b in zip(("dcb", "rows"), *dcbs):
                if what == "dcb":
                    a, b = a[..., written], b[..., written]
                res[f"{regime}rel_split_{what}_{pipe}"] = rel(b, a)
                res[f"{regime}finite_split_{what}_{pipe}"] = float(torch.isfinite(b).all())
    return name, res


def run_rms_schedules(name):
    """Every launch schedule of the gated-norm backward (rows per block, prefetch) against the
    reference's gradients: 37 rows = programs of 16 rows, the last partial; groups of 8 channels
    (16 rows per block), 48 of 96 (one to four blocks per program), 1024 and 2048 channels (one or
    two rows per block, 16 and 8 blocks per program)."""
    from kernels.rmsnorm_gated.triton_op import bwd_schedules, rmsnorm_gated_bwd

    res = {}
    for gs, d, before, wz in ((8, 24, False, True), (48, 96, True, True), (1024, 2048, False, True),
                              (2048, 2048, False, False)):
        y = torch.randn(37, d, requires_grad=True)
        z = torch.randn(37, d, requires_grad=True) if wz else None
        w = (1 + 0.1 * torch.randn(d)).requires_grad_(True)
        go = torch.randn(37, d)
        o0 = rms_ref(y, z, w, group_size=gs, norm_before_gate=before)
        g0 = torch.autograd.grad((o0 * go).sum(), [y, w] + ([z] if wz else []))
        with torch.no_grad():  # the forward's saved 1 / rms per row and group
            v = y * torch.nn.functional.silu(z) if wz and not before else y
            rstd = torch.rsqrt(v.reshape(37, d // gs, gs).pow(2).mean(-1) + 1e-5).contiguous()
        for sch in bwd_schedules(triton_next_pow2(gs)):
            dy, dz, dw = rmsnorm_gated_bwd(y.detach(), z.detach() if wz else None, w.detach(), rstd, go, gs, before,
                                           schedule=sch)
            tag = f"g{gs}_r{sch.kwargs['BLOCK_R']}_w{sch.num_warps}_{'pf' if sch.kwargs['PREFETCH'] else 'nopf'}"
            res[f"{tag}_dy"] = rel(dy, g0[0])
            res[f"{tag}_dweight"] = rel(dw, g0[1])
            if wz:
                res[f"{tag}_dz"] = rel(dz, g0[2])
    return name, res


def run_conv_fwd_schedules(name):
    """The conv forward under each CUDA tile schedule: the same bits as the first (the SSD's
    conv_source rerun relies on it) and the reference's values; 2 x 45 positions x 72 channels
    with documents cut inside tiles, width 4, bias, SiLU."""
    from kernels.conv1d.triton_op import FWD_SCHEDULES, conv_forward

    x = torch.randn(2, 45, 72)
    w = torch.randn(72, 4)
    b = torch.randn(72)
    seq = torch.zeros(2, 45, dtype=torch.int32)
    seq[0, 7:] += 1
    seq[0, 30:] += 1
    seq[1, 17:] += 1
    ref = conv_ref(x, w, b, seq_idx=seq, activation="silu")
    outs = [conv_forward(x, w, b, seq, True, schedule=sch) for sch in FWD_SCHEDULES]
    res = {f"bits_vs_first_{i}": (o - outs[0]).abs().max().item() for i, o in enumerate(outs)}
    res.update({f"y_{i}": rel(o, ref) for i, o in enumerate(outs)})
    return name, res


def triton_next_pow2(n):
    return 1 << (int(n) - 1).bit_length()


SSD_CASES = {
    # odd seqlen (3 chunks, last partial), 2 groups, seq_idx, initial states, z, D (h), dt_bias, limits
    "ssd_full": (dict(batch=2, seqlen=45, nheads=4, headdim=5, ngroups=2, dstate=6), 16, dict(limit=(0.01, 3.0))),
    # 3 groups, D (h, p), no z, no initial states, 32-chunks, odd dims
    "ssd_groups": (dict(batch=1, seqlen=77, nheads=6, headdim=8, ngroups=3, dstate=16), 32,
                   dict(D_shape="hp", with_z=False, with_init=False)),
    # exactly one chunk, no seq_idx, no softplus, no bias
    "ssd_one_chunk": (dict(batch=2, seqlen=16, nheads=2, headdim=4, ngroups=1, dstate=4), 16,
                      dict(with_seq=False, with_bias=False, softplus=False)),
    # many chunks (state passing), 1 group; chunk 32 = two 16-tiles per chunk in the interpreter
    "ssd_many_chunks": (dict(batch=1, seqlen=130, nheads=2, headdim=3, ngroups=1, dstate=5), 32, dict()),
    # steep decays (A ~ -20, softplus(dt) ~ 4: cs falls by ~100 a position): the decay above the
    # diagonal overflows float32 unless clamped (CB's zeros times inf would be NaN). dA is
    # ill-conditioned beyond float32 there (a sum of terms ~1e5 times larger than it: the float32
    # reference itself is up to 1e9 relative off the float64 one), so it is not compared
    "ssd_steep": (dict(batch=2, seqlen=70, nheads=4, headdim=8, ngroups=2, dstate=8), 32,
                  dict(a_scale=20.0, dt_shift=5.0, skip=("dA",))),
    # dstate 40: the chunk scan's C . prev loop takes three steps of 16 in the interpreter, the last
    # one masked (on the GPU its configs step through dstate by 64 or 32)
    "ssd_wide_state": (dict(batch=1, seqlen=50, nheads=2, headdim=8, ngroups=1, dstate=40), 32, dict()),
}


def main():
    out = {}
    for name, (shape, chunk, kw) in SSD_CASES.items():
        out.update([run_ssd(name, shape, chunk, **kw)])
    out.update([run_conv_ssd_source("ssd_conv_source")])
    out.update([run_ssd_recompute_states("ssd_recompute_states")])
    # two heads per group: the interpreter's dB/dC take two partial sums, summed into the packed
    # gradient; three: one, which the kernel writes into it directly (strided)
    for before, conv, states, nheads in ((False, False, False, 4), (True, True, True, 6)):
        out.update([run_mamba_inner(f"mamba_inner_{'before' if before else 'after'}_{'recompute' if conv else 'keep'}",
                                    before, conv, states, nheads=nheads)])
    for width in (2, 3, 4):
        out.update([run_conv(f"conv_w{width}_silu", width, "silu")])
    out.update([run_conv("conv_w4_none", 4, None)])
    # backward in the interpreter: segments of 16 positions, streamed 4 rows at a time, channel
    # blocks of 64. 50 positions = 4 segments, the last partial; 72 channels = 2 blocks, the last
    # partial; documents start inside a segment (3, 13, 37), on a segment (16, 32, 48) and one
    # position before one (31, 47: the halo reads the same document); batch row 1 has none
    long_cuts = ((3, 13, 16, 31, 32, 37, 47, 48), ())
    out.update([run_conv("conv_w4_silu_long", 4, "silu", 2, 50, 72, long_cuts, strided=True)])
    out.update([run_conv("conv_w3_silu_long_nobias", 3, "silu", 2, 50, 40, long_cuts, bias=False)])
    out.update([run_conv("conv_w2_none_long_nobias", 2, None, 2, 50, 40, long_cuts, bias=False, strided=True)])
    out.update([run_conv("conv_w4_silu_noseq", 4, "silu", 3, 45, 40, None)])
    for gs, before, wz in ((8, False, True), (24, True, True), (16, False, False)):
        out.update([run_rms(f"rms_g{gs}_{'before' if before else 'after'}_{'z' if wz else 'noz'}", gs, before, wz)])
    out.update([run_rms_schedules("rms_bwd_schedules")])
    out.update([run_ssd_head_pipe("ssd_head_pipe")])
    out.update([run_ssd_dcb_split_decay("ssd_dcb_split_decay")])
    out.update([run_ssd_nsplit("ssd_nsplit")])
    out.update([run_ssd_launch_order("ssd_launch_order")])
    out.update([run_ssd_states_lp_only("ssd_states_lp_only")])
    out.update([run_ssd_cb_structure("ssd_cb_structure")])
    out.update([run_conv_fwd_schedules("conv_fwd_schedules")])
    print("JSON:" + json.dumps(out))


if __name__ == "__main__":
    main()
