"""GPU checks of the Triton kernels (pytest -m gpu; skipped without CUDA).

bf16/fp16 against the float32 reference on the same rounded inputs (relative error < 1e-2; the
output gradient is drawn representable in the input dtype, and where z gates the output the
reference's gradient is rounded at the same point as the op's: see ref_at),
float32 against the reference (< 1e-4, IEEE dots), seqlen 131072, offsets past 2^31 elements,
no NaN in bf16 backward over many random draws, outputs fully written (the caching allocator's
memory is filled with NaN before every call, so an unwritten element shows up as NaN), and a
bitwise-deterministic backward (SSD, conv1d).
"""

import math

import pytest
import torch

import kernels
from kernels.conv1d.reference import causal_conv1d as conv_ref
from kernels.rmsnorm_gated.reference import rmsnorm_gated as rms_ref
from kernels.ssd.reference import ssd_scan as ssd_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fmt(errs):
    return "relative errors: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items())


def poison():
    """Fill (most of) the caching allocator's free memory with NaN, so that torch.empty outputs
    that a kernel fails to write come out NaN."""
    free = torch.cuda.mem_get_info()[0]
    n = max(1, int(free * 0.4) // 4)
    t = torch.empty(n, dtype=torch.float32, device="cuda")
    t.fill_(float("nan"))
    del t


def seq_idx_random(batch, seqlen, ndocs=4):
    s = torch.zeros(batch, seqlen, dtype=torch.int32)
    for b in range(batch):
        for c in torch.randint(1, seqlen, (ndocs,)).tolist():
            s[b, c:] += 1
    return s.cuda()


def ssd_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, seq=True, init=True, z=True, D_hp=False):
    dev = "cuda"
    t = dict(
        x=torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype),
        dt=(torch.randn(batch, seqlen, nheads, device=dev) - 1).to(dtype),
        A=-torch.exp(torch.rand(nheads, device=dev) * 3 - 2),
        B=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        C=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
    )
    opt = dict(D=torch.randn(nheads, headdim, device=dev) if D_hp else torch.randn(nheads, device=dev),
               dt_bias=torch.randn(nheads, device=dev) * 0.5)
    if z:
        opt["z"] = torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype)
    if init:
        opt["initial_states"] = torch.randn(batch, nheads, headdim, dstate, device=dev)
    if seq:
        opt["seq_idx"] = seq_idx_random(batch, seqlen)
    return t, opt


class _RoundGrad(torch.autograd.Function):
    """Identity whose backward rounds the gradient to `dtype`, as the Triton op does with
    dy = dout * silu(z) before its kernels (they read dy in the input dtype, like mamba_ssm)."""

    @staticmethod
    def forward(ctx, y, dtype):
        ctx.dtype = dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).float(), None


def ref_at(dtype):
    """The float32 reference seeing the gradients at the precision the Triton op receives them."""

    def fn(x, dt, A, B, C, *, z=None, **kw):
        y, fs = ssd_ref(x, dt, A, B, C, **kw)
        if z is not None:
            y = _RoundGrad.apply(y, dtype) * torch.nn.functional.silu(z)
        return y, fs

    return fn


def run_ssd(fn, t, opt, chunk, seeds=None, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in {**t, **opt}.items() if k != "seq_idx"}
    args = {k: leaves.get(k, v) for k, v in {**t, **opt}.items()}
    y, fs = fn(**args, chunk_size=chunk, return_final_states=True, **kw)
    if seeds is None:
        # the output gradient reaches the op in y's dtype: draw it representable there
        seeds = (torch.randn_like(y).float(), torch.randn_like(fs))
    loss = (y.float() * seeds[0]).sum() + (fs * seeds[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, fs, dict(zip(leaves, grads)), seeds


def upcast(d):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in d.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_low_precision_vs_fp32_reference(dtype):
    t, opt = ssd_inputs(2, 1000, 8, 64, 2, 64, dtype)
    poison()
    y, fs, g, seeds = run_ssd(kernels.ssd_scan, t, opt, 256, dt_limit=(0.001, 10.0))
    y0, fs0, g0, _ = run_ssd(ref_at(dtype), upcast(t), upcast(opt), 256, seeds=seeds, dt_limit=(0.001, 10.0))
    assert y.dtype == dtype
    errs = {"y": rel(y, y0), "final": rel(fs, fs0), **{f"d{k}": rel(g[k], g0[k]) for k in g}}
    assert all(math.isfinite(e) and e < 1e-2 for e in errs.values()), fmt(errs)


@pytest.mark.parametrize("chunk, hdim, dstate", [(64, 32, 32), (16, 16, 16), (32, 16, 16), (32, 32, 16),
                                                  (128, 64, 64), (256, 32, 32)])
def test_ssd_fp32_vs_reference(chunk, hdim, dstate):
    """Chunk sizes below the autotuned tile sizes (64-128 positions) included: a tile that ran past
    its chunk gave wrong outputs and gradients for chunk_size 32 until the tiles were clamped."""
    t, opt = ssd_inputs(1, 777, 4, hdim, 2, dstate, torch.float32, D_hp=True)
    poison()
    y, fs, g, seeds = run_ssd(kernels.ssd_scan, t, opt, chunk)
    y0, fs0, g0, _ = run_ssd(ssd_ref, t, opt, chunk, seeds=seeds)
    errs = {"y": rel(y, y0), "final": rel(fs, fs0), **{f"d{k}": rel(g[k], g0[k]) for k in g}}
    tol = {k: (1e-3 if k in ("dA", "ddt_bias", "dD") else 1e-4) for k in errs}
    assert all(errs[k] < tol[k] for k in errs), fmt(errs)


def test_ssd_seqlen_131072_bf16():
    t, opt = ssd_inputs(1, 131072, 8, 64, 1, 64, torch.bfloat16, z=False)
    poison()
    y, fs, g, seeds = run_ssd(kernels.ssd_scan, t, opt, 256)
    y0, fs0, g0, _ = run_ssd(ref_at(torch.bfloat16), upcast(t), upcast(opt), 256, seeds=seeds)
    errs = {"y": rel(y, y0), "final": rel(fs, fs0), **{f"d{k}": rel(g[k], g0[k]) for k in g}}
    assert all(math.isfinite(e) and e < 1e-2 for e in errs.values()), fmt(errs)


def test_ssd_offsets_past_2_31_elements():
    """x has 1 x 131584 x 128 x 128 > 2^31 elements: the last heads sit past the 32-bit range."""
    batch, seqlen, nheads, headdim, dstate = 1, 131072 + 512, 128, 128, 16
    assert batch * seqlen * nheads * headdim > 2**31
    t, opt = ssd_inputs(batch, seqlen, nheads, headdim, 1, dstate, torch.bfloat16, z=False, init=False)
    poison()
    x = t["x"].requires_grad_(True)
    y = kernels.ssd_scan(x, t["dt"], t["A"], t["B"], t["C"], chunk_size=256, D=opt["D"], dt_bias=opt["dt_bias"],
                         seq_idx=opt["seq_idx"])
    gy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], gy)
    hs = slice(nheads - 4, nheads)  # the heads with the largest offsets
    xs = x.detach()[:, :, hs].float().requires_grad_(True)
    y0 = ssd_ref(xs, t["dt"][:, :, hs].float(), t["A"][hs], t["B"].float(), t["C"].float(), chunk_size=256,
                 D=opt["D"][hs], dt_bias=opt["dt_bias"][hs], seq_idx=opt["seq_idx"])
    (dx0,) = torch.autograd.grad(y0, [xs], gy[:, :, hs].float())
    assert rel(y[:, :, hs], y0) < 1e-2
    assert rel(dx[:, :, hs], dx0) < 1e-2
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()


def test_ssd_bf16_backward_no_nan_many_draws():
    for i in range(24):
        t, opt = ssd_inputs(2, 600 + 37 * i, 8, 64, 2, 64, torch.bfloat16, init=bool(i % 2))
        with torch.no_grad():
            t["A"].copy_(-torch.exp(torch.rand_like(t["A"]) * 8 - 5))  # |A| from 0.007 to 20
            t["dt"].mul_(1 + 2 * (i % 3))
        poison()
        y, fs, g, _ = run_ssd(kernels.ssd_scan, t, opt, 256)
        assert torch.isfinite(y).all() and torch.isfinite(fs).all(), i
        bad = [k for k, v in g.items() if not torch.isfinite(v).all()]
        assert not bad, (i, bad)


def test_ssd_backward_deterministic():
    t, opt = ssd_inputs(2, 1500, 16, 64, 2, 128, torch.bfloat16)
    _, _, g1, seeds = run_ssd(kernels.ssd_scan, t, opt, 256)
    _, _, g2, _ = run_ssd(kernels.ssd_scan, t, opt, 256, seeds=seeds)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_ssd_deterministic_flag_fixed_bits_close_to_tuned():
    """kernels.deterministic: the autotuned kernels take their first config; two runs give the same
    bits, and the result stays within bf16 error of the tuned configs' result."""
    t, opt = ssd_inputs(2, 1500, 16, 64, 2, 128, torch.bfloat16)
    y0, _, g0, seeds = run_ssd(kernels.ssd_scan, t, opt, 256)
    kernels.set_deterministic(True)
    try:
        y1, _, g1, _ = run_ssd(kernels.ssd_scan, t, opt, 256, seeds=seeds)
        y2, _, g2, _ = run_ssd(kernels.ssd_scan, t, opt, 256, seeds=seeds)
    finally:
        kernels.set_deterministic(False)
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    errs = {"y": rel(y1, y0), **{f"d{k}": rel(g1[k], g0[k]) for k in g1}}
    assert all(math.isfinite(e) and e < 1e-2 for e in errs.values()), fmt(errs)


def test_ssd_conv_source_same_bits_bf16():
    """conv1d -> SSD with conv_source (the conv rerun in the SSD backward) against the same ops
    keeping x, B, C: the same output and gradient bits."""
    batch, seqlen, nheads, hdim, ngroups, dstate = 2, 1000, 8, 64, 2, 64
    d_inner, gn = nheads * hdim, ngroups * dstate
    dev, bf = "cuda", torch.bfloat16
    leaves = [torch.randn(batch, seqlen, d_inner + 2 * gn, device=dev, dtype=bf),
              torch.randn(d_inner + 2 * gn, 4, device=dev) * 0.5, torch.randn(d_inner + 2 * gn, device=dev) * 0.1,
              torch.randn(batch, seqlen, nheads, device=dev, dtype=bf) - 1, -torch.rand(nheads, device=dev) - 0.2,
              torch.randn(nheads, device=dev), torch.randn(nheads, device=dev) * 0.1]
    leaves = [t.requires_grad_(True) for t in leaves]
    seq_idx = seq_idx_random(batch, seqlen)
    seed = torch.randn(batch, seqlen, nheads, hdim, device=dev, dtype=bf)
    runs = []
    for use_source in (False, True):
        xbc_in, w, b, dt, A, D, dt_bias = leaves
        xbc = kernels.causal_conv1d(xbc_in, w, b, seq_idx=seq_idx, activation="silu")
        x, B, C = torch.split(xbc, [d_inner, gn, gn], dim=-1)
        poison()
        y = kernels.ssd_scan(x.reshape(batch, seqlen, nheads, hdim), dt, A, B.reshape(batch, seqlen, ngroups, dstate),
                             C.reshape(batch, seqlen, ngroups, dstate), chunk_size=256, D=D, dt_bias=dt_bias,
                             seq_idx=seq_idx, conv_source=(xbc_in, w, b, "silu") if use_source else None)
        runs.append((y, torch.autograd.grad((y.float() * seed.float()).sum(), leaves)))
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.isfinite(g).all() for g in g1)


def test_ssd_recompute_states_same_bits_bf16():
    """recompute_states (CB and chunk states rerun in the backward) against keeping them: the same
    output, final-state and gradient bits (seq_idx, initial states, z, several groups)."""
    t, opt = ssd_inputs(2, 1500, 16, 64, 2, 128, torch.bfloat16)
    poison()
    y0, f0, g0, seeds = run_ssd(kernels.ssd_scan, t, opt, 256)
    poison()
    y1, f1, g1, _ = run_ssd(kernels.ssd_scan, t, opt, 256, seeds=seeds, recompute_states=True)
    assert torch.equal(y0, y1) and torch.equal(f0, f1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0), [k for k in g0 if not torch.equal(g0[k], g1[k])]
    assert all(torch.isfinite(g).all() for g in g1.values())


def state_pass_inputs(shape, q, dt_):
    """x, B (dt_), seq_idx (random documents), float32 initial states and dt_cumsum's dtp, cs for
    the state-passing tests at shape (batch, seqlen, nheads, headdim, ngroups, dstate), chunk q."""
    from kernels.ssd import triton_fwd as fwd

    batch, seqlen, h, p, g, n = shape
    x = torch.randn(batch, seqlen, h, p, device="cuda", dtype=dt_)
    dt = (torch.randn(batch, seqlen, h, device="cuda") - 1).to(dt_)
    A = -torch.exp(torch.rand(h, device="cuda") * 2 - 1)
    B = torch.randn(batch, seqlen, g, n, device="cuda", dtype=dt_)
    seq = seq_idx_random(batch, seqlen)
    init = torch.randn(batch, h, p, n, device="cuda")
    dtp, cs = fwd.dt_cumsum(dt, None, A, q, True, (0.0, math.inf))
    return x, B, seq, init, dtp, cs


def test_ssd_states_without_float32_prev_same_bits_bf16():
    """Chunk states + state passing with store_f32=False (what a forward that keeps nothing for a
    backward runs) against store_f32=True: the same bf16 copy and final state bits, no float32 prev;
    documents and initial states, outputs poisoned first."""
    from kernels.ssd import triton_states as states

    q = 256
    x, B, seq, init, dtp, cs = state_pass_inputs((2, 3000, 16, 64, 2, 128), q, torch.bfloat16)
    outs = []
    for store_f32 in (True, False):
        poison()
        outs.append(states.states_and_pass(x, B, dtp, cs, seq, init, q, "tf32", store_f32=store_f32))
    (pa, la, fa), (pb, lb, fb) = outs
    assert pb is None and pa is not None
    assert torch.isfinite(lb).all() and torch.isfinite(fb).all()
    assert torch.equal(la, lb) and torch.equal(fa, fb)



def test_ssd_no_grad_forward_same_bits_bf16():
    """The op's no-grad forward (nothing kept for a backward) against its grad-mode forward: the same
    output and final-state bits."""
    t, opt = ssd_inputs(2, 1500, 16, 64, 2, 128, torch.bfloat16)
    poison()
    y1, f1, _, _ = run_ssd(kernels.ssd_scan, t, opt, 256)
    poison()
    with torch.no_grad():
        y0, f0 = kernels.ssd_scan(**t, **opt, chunk_size=256, return_final_states=True)
    assert torch.isfinite(y0).all() and torch.isfinite(f0).all()
    assert torch.equal(y0, y1.detach()) and torch.equal(f0, f1.detach())


@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv1d_bf16_vs_reference(width):
    x = torch.randn(2, 3001, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, width, device="cuda") * 0.5
    b = torch.randn(768, device="cuda")
    seq = seq_idx_random(2, 3001)
    poison()
    leaves = [v.clone().requires_grad_(True) for v in (x, w, b)]
    y = kernels.causal_conv1d(*leaves, seq_idx=seq, activation="silu")
    gy = torch.randn_like(y, dtype=torch.float32)
    g = torch.autograd.grad((y.float() * gy).sum(), leaves)
    leaves0 = [v.float().requires_grad_(True) for v in (x, w, b)]
    y0 = conv_ref(*leaves0, seq_idx=seq, activation="silu")
    g0 = torch.autograd.grad((y0 * gy).sum(), leaves0)
    assert rel(y, y0) < 1e-2
    assert all(rel(a, c) < 1e-2 for a, c in zip(g, g0))


def _conv_grads(x, w, b, seq, act, gy):
    leaves = [v.clone().requires_grad_(True) for v in (x, w, b) if v is not None]
    y = kernels.causal_conv1d(leaves[0], leaves[1], leaves[2] if b is not None else None, seq_idx=seq, activation=act)
    return y, torch.autograd.grad(y, leaves, grad_outputs=gy)


@pytest.mark.parametrize("width,act,with_bias,with_seq,strided", [
    (4, "silu", True, True, True), (4, None, False, True, False), (3, "silu", False, False, True),
    (2, None, True, False, False)])
def test_conv1d_fp32_backward_paths(width, act, with_bias, with_seq, strided):
    """Every backward path (SiLU or not, bias or not, seq_idx or not), x and the output gradient
    strided, 200 channels (a partial channel block), several position segments."""
    batch, seqlen, dim = 3, 1203, 200
    x = torch.randn(batch, dim, seqlen, device="cuda").transpose(1, 2) if strided else torch.randn(
        batch, seqlen, dim, device="cuda")
    w = torch.randn(dim, width, device="cuda") * 0.5
    b = torch.randn(dim, device="cuda") if with_bias else None
    seq = seq_idx_random(batch, seqlen, ndocs=8) if with_seq else None
    gy = torch.randn(seqlen, batch, dim, device="cuda").transpose(0, 1) if strided else torch.randn(
        batch, seqlen, dim, device="cuda")
    poison()
    y, g = _conv_grads(x, w, b, seq, act, gy)
    leaves0 = [v.clone().requires_grad_(True) for v in (x, w, b) if v is not None]
    y0 = conv_ref(leaves0[0], leaves0[1], leaves0[2] if with_bias else None, seq_idx=seq, activation=act)
    g0 = torch.autograd.grad(y0, leaves0, grad_outputs=gy)
    errs = {"y": rel(y, y0), **{k: rel(a, c) for k, a, c in zip(("dx", "dweight", "dbias"), g, g0)}}
    assert all(e < 1e-4 for e in errs.values()), fmt(errs)


def test_conv1d_backward_deterministic():
    x = torch.randn(4, 4099, 1152, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1152, 4, device="cuda") * 0.5
    b = torch.randn(1152, device="cuda")
    seq = seq_idx_random(4, 4099)
    gy = torch.randn_like(x)
    _, g1 = _conv_grads(x, w, b, seq, "silu", gy)
    _, g2 = _conv_grads(x, w, b, seq, "silu", gy)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_conv1d_offsets_past_2_31_elements():
    """x of more than 2^31 elements; a document starts at p0, so positions from p0 on (outputs and
    dx) match the reference run on that slice alone."""
    batch, seqlen, dim = 1, 2**31 // 4096 + 1000, 4096
    x = torch.randn(batch, seqlen, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(dim, 4, device="cuda") * 0.5
    b = torch.randn(dim, device="cuda")
    p0 = seqlen - 3000
    seq = torch.zeros(batch, seqlen, dtype=torch.int32, device="cuda")
    seq[:, p0:] = 1
    seq[:, p0 + 1234:] = 2
    gy = torch.randn_like(x)
    y, g = _conv_grads(x, w, b, seq, "silu", gy)
    xs = x[:, p0:].float().requires_grad_(True)
    y0 = conv_ref(xs, w, b, seq_idx=seq[:, p0:], activation="silu")
    (dx0,) = torch.autograd.grad(y0, [xs], grad_outputs=gy[:, p0:].float())
    errs = {"y": rel(y[:, p0:], y0), "dx": rel(g[0][:, p0:], dx0)}
    assert all(e < 1e-2 for e in errs.values()), fmt(errs)


@pytest.mark.parametrize("before", [False, True])
def test_rmsnorm_gated_bf16_vs_reference(before):
    y = torch.randn(2, 2049, 1024, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(y)
    w = 1 + 0.1 * torch.randn(1024, device="cuda")
    poison()
    leaves = [v.clone().requires_grad_(True) for v in (y, z, w)]
    o = kernels.rmsnorm_gated(leaves[0], leaves[1], leaves[2], group_size=256, norm_before_gate=before)
    go = torch.randn_like(o, dtype=torch.float32)
    g = torch.autograd.grad((o.float() * go).sum(), leaves)
    leaves0 = [v.float().requires_grad_(True) for v in (y, z, w)]
    o0 = rms_ref(leaves0[0], leaves0[1], leaves0[2], group_size=256, norm_before_gate=before)
    g0 = torch.autograd.grad((o0 * go).sum(), leaves0)
    assert rel(o, o0) < 1e-2
    assert all(rel(a, c) < 1e-2 for a, c in zip(g, g0))


def ssd_kernel_inputs(shape, q, prec, dt_=torch.bfloat16):
    """What the SSD's within-chunk kernels (chunk scan, dx, dCB, dB/dC) take at `shape` (batch,
    seqlen, heads, headdim, groups, dstate), with random documents: x, dy, B, C, seq_idx, dtp, cs, cb,
    prev and prev_lp (float32 and rounded to dt_, from the forward kernels) and a random float32 dS."""
    from kernels.ssd import triton_fwd as fwd
    from kernels.ssd import triton_states as states

    batch, seqlen, h, p, g, n = shape
    x, dy = (torch.randn(batch, seqlen, h, p, device="cuda", dtype=dt_) for _ in range(2))
    dt = (torch.randn(batch, seqlen, h, device="cuda") - 1).to(dt_)
    A = -torch.exp(torch.rand(h, device="cuda") * 2 - 1)
    B, C = (torch.randn(batch, seqlen, g, n, device="cuda", dtype=dt_) for _ in range(2))
    seq = seq_idx_random(batch, seqlen)
    dtp, cs = fwd.dt_cumsum(dt, None, A, q, True, (0.0, math.inf))
    cb = fwd.compute_cb(C, B, seq, q, prec)
    prev, prev_lp, _ = states.state_pass(states.chunk_outer(x, B, dtp, cs, seq, q, 0, prec), cs, seq, None, seqlen,
                                         q, dt_)
    return x, dy, B, C, seq, dtp, cs, cb, prev, prev_lp, torch.randn_like(prev)


@pytest.mark.parametrize("shape", [(2, 4096, 64, 64, 1, 128), (1, 8192, 128, 64, 8, 128)])
def test_ssd_dcb_dbc_loop_structures_same_bits_bf16(shape):
    """The dCB and dB/dC kernels with the head loop innermost (HEAD_PIPE) and with the loop over
    headdim blocks, at headdim 64 (one block): the same bits, outputs poisoned first."""
    from kernels.ssd import triton_bwd as bwd

    q, prec, g = 256, "tf32", shape[4]
    x, dy, B, C, seq, dtp, cs, cb, prev, _, dS = ssd_kernel_inputs(shape, q, prec)
    outs = []
    for pipe in (False, True):
        poison()
        dcb, rows = bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, head_pipe=pipe)
        outs.append((dcb, rows, *bwd.chunk_dbc(x, dy, B, C, prev, dS, dcb, dtp, cs, seq, q, prec, head_pipe=pipe)))
    # dCB is written in its block-lower-triangular 64x64 tiles only (consumers mask the rest)
    pos = torch.arange(q, device="cuda") // 64
    written = pos[None, :] <= pos[:, None]
    for name, a, b in zip(("dcb", "rows", "dB", "dC", "offd"), *outs):
        if name == "dcb":
            a, b = a[..., written], b[..., written]
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", [(2, 4096, 64, 64, 1, 128), (1, 8192, 128, 64, 8, 128)])
def test_ssd_every_head_split_agrees_bf16(shape):
    """dCB + dB/dC at every head split the backward chooses from (bwd.split_candidates), outputs
    poisoned first: dB and dC within one bf16 ulp of the default split's (the float32 partial sums
    differ only in the order of the head sums, then round to bf16), the dcs terms within 1e-5."""
    from kernels.ssd import triton_bwd as bwd

    q, prec, h, g = 256, "tf32", shape[2], shape[4]
    x, dy, B, C, seq, dtp, cs, cb, prev, _, dS = ssd_kernel_inputs(shape, q, prec)
    splits = bwd.split_candidates(h // g)
    outs = {}
    for k in splits:
        poison()
        outs[k] = bwd.chunk_dcb_dbc(x, dy, B, C, prev, dS, dtp, cs, seq, cb, q, prec, nsplit=k)
    ref = outs[splits[-1]]
    for k in splits[:-1]:
        for name, a, b in zip(("dB", "dC", "rows", "offd"), outs[k], ref):
            assert torch.isfinite(a).all(), (k, name)
            assert rel(a, b) < (4e-3 if name in ("dB", "dC") else 1e-5), (k, name, rel(a, b))  # 1 bf16 ulp
    poison()
    chosen = bwd.chunk_dcb_dbc(x, dy, B, C, prev, dS, dtp, cs, seq, cb, q, prec)  # the timed choice
    assert all(rel(a, b) < (4e-3 if i < 2 else 1e-5) for i, (a, b) in enumerate(zip(chosen, ref)))


@pytest.mark.parametrize("shape", [(2, 4096, 64, 64, 1, 128), (1, 8192, 128, 64, 8, 128)])
def test_ssd_every_config_agrees_bf16(shape):
    """Every config of the chunk scan, dx, dCB and dB/dC against the first (the fixed one), with z, D
    and documents, outputs poisoned first: other tiles sum in another order (bf16 outputs within a
    few ulps, 2^-8 relative each; float32 outputs ~1e-5); dCB's split decay's weights differ by one
    float32 rounding."""
    from kernels.ssd import triton_bwd as bwd
    from kernels.ssd import triton_bwd_dx as bwd_dx
    from kernels.ssd import triton_fwd as fwd

    q, prec, h, g = 256, "tf32", shape[2], shape[4]
    x, dy, B, C, seq, dtp, cs, cb, prev, prev_lp, dS = ssd_kernel_inputs(shape, q, prec)
    z, D = torch.randn_like(x), torch.randn(h, device="cuda")
    outs = []
    for i in range(len(fwd._CHUNK_SCAN_SPACE)):
        poison()
        outs.append(fwd.chunk_scan(cb, x, z, D, C, prev_lp, dtp, cs, seq, q, True, prec, config=i))
    for i, (out, ypre) in enumerate(outs[1:], 1):
        assert rel(out, outs[0][0]) < 4e-3 and rel(ypre, outs[0][1]) < 4e-3, i
    dxs = []
    for i in range(len(bwd_dx._DX_SPACE)):
        poison()
        dxs.append(bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq, q, prec, config=i))
    for i, got in enumerate(dxs[1:], 1):
        for what, a, b, tol in zip(("dx", "ddtp", "dcs", "dD"), dxs[0], got, (4e-3, 1e-4, 1e-4, 1e-5)):
            assert torch.isfinite(b.float()).all(), (i, what)
            assert rel(b, a) < tol, (i, what, rel(b, a))
    # every dCB config (the split decay's weights differ by one float32 rounding; float32 outputs, the
    # block-lower-triangular 64 x 64 tiles it writes), then every dB/dC config (bf16 outputs)
    pos = torch.arange(q, device="cuda") // 64
    written = pos[None, :] <= pos[:, None]
    dcbs = []
    for i in range(len(bwd._DCB_SPACE)):
        poison()
        dcbs.append(bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, config=i))
    a, ra = dcbs[0]
    for i, (b, rb) in enumerate(dcbs[1:], 1):
        assert torch.isfinite(b[..., written]).all() and torch.isfinite(rb).all(), i
        assert rel(b[..., written], a[..., written]) < 1e-5 and rel(rb, ra) < 1e-5, i
    dbcs = []
    for i in range(len(bwd._DBC_SPACE)):
        poison()
        dbcs.append(bwd.chunk_dbc(x, dy, B, C, prev, dS.to(x.dtype), a, dtp, cs, seq, q, prec, config=i))
    for i, got in enumerate(dbcs[1:], 1):
        for what, want, have, tol in zip(("dB", "dC", "offd"), dbcs[0], got, (4e-3, 4e-3, 1e-5)):
            assert torch.isfinite(have.float()).all(), (i, what)
            assert rel(have, want) < tol, (i, what, rel(have, want))


def test_ssd_launch_order_same_bits_bf16():
    """The chunk scan and dx launched heads-fast (the default) and chunks-fast, same config, with z,
    D, groups and documents, outputs poisoned first: each program computes the same tile, so the
    same bits. 2 x 8192 at chunk 256 with 16 heads: 64 chunks in grid axis 2, then axis 1."""
    from kernels.ssd import triton_bwd_dx as bwd_dx
    from kernels.ssd import triton_fwd as fwd

    q, prec, h = 256, "tf32", 16
    x, dy, B, C, seq, dtp, cs, cb, _, prev_lp, dS = ssd_kernel_inputs((2, 8192, h, 64, 2, 128), q, prec)
    z, D = torch.randn_like(x), torch.randn(h, device="cuda")
    outs = {}
    for order in (True, False):
        poison()
        outs[order] = (fwd.chunk_scan(cb, x, z, D, C, prev_lp, dtp, cs, seq, q, True, prec, config=0,
                                      heads_fast=order)
                       + bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq, q, prec, config=0, heads_fast=order))
    for what, a, b in zip(("out", "ypre", "dx", "ddtp", "dcs", "dD"), outs[True], outs[False]):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b), what


@pytest.mark.parametrize("shape", [(2, 4096, 64, 64, 1, 128), (1, 8192, 128, 64, 8, 128), (1, 3000, 16, 64, 2, 128)])
def test_ssd_chunk_outer_every_config_agrees_bf16(shape):
    """The chunk-states kernel (forward chunk states, backward dprev) at every config of its list
    against the tuned one, with documents, outputs poisoned first: another position tile is another
    float32 summation order over a chunk's positions (and other bf16 hi/lo splits of the same
    products), so within 1e-5; every element written and finite."""
    from kernels.ssd import triton_states as states

    q, prec, dt_ = 256, "tf32", torch.bfloat16
    x, B, seq, _, dtp, cs = state_pass_inputs(shape, q, dt_)
    dy, C = torch.randn_like(x), torch.randn_like(B)
    for mode, a, b in ((0, x, B), (1, dy, C)):
        poison()
        ref = states.chunk_outer(a, b, dtp, cs, seq, q, mode, prec)
        assert torch.isfinite(ref).all() and ref.abs().sum() > 0, mode
        for config in range(states._chunk_outer_tuned.num_configs):
            poison()
            out = states.chunk_outer(a, b, dtp, cs, seq, q, mode, prec, config=config)
            assert torch.isfinite(out).all(), (mode, config)
            assert rel(out, ref) < 1e-5, (mode, config)


def test_conv1d_forward_every_schedule_same_bits_bf16():
    """The conv forward's CUDA tiles give the same output bits (the SSD's conv_source rerun relies
    on it), at hybrid_1b3's conv width (4096 + 2 x 128 channels) with documents, outputs poisoned."""
    from kernels.conv1d.triton_op import FWD_SCHEDULES, conv_forward

    x = torch.randn(2, 1000, 4352, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4352, 4, device="cuda")
    b = torch.randn(4352, device="cuda")
    seq = seq_idx_random(2, 1000)
    outs = []
    for sch in FWD_SCHEDULES:
        poison()
        outs.append(conv_forward(x, w, b, seq, True, schedule=sch))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert rel(outs[0], conv_ref(x.float(), w, b, seq_idx=seq, activation="silu")) < 1e-2


@pytest.mark.parametrize("group_size,d", [(4096, 4096), (2048, 2048), (256, 1024)])
def test_rmsnorm_backward_every_schedule_bf16(group_size, d):
    """Each launch schedule the autotuner may pick, at the presets' widths (hybrid_1b3 4096,
    hybrid_460m 2048 channels, one group) and a grouped one, against the float32 reference; outputs
    poisoned first. 3000 rows: programs of 16 rows, the last partial."""
    from kernels.rmsnorm_gated.triton_op import bwd_schedules, rmsnorm_gated_bwd

    y = torch.randn(3000, d, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(y)
    w = 1 + 0.1 * torch.randn(d, device="cuda")
    go = torch.randn_like(y)
    leaves0 = [v.float().requires_grad_(True) for v in (y, z, w)]
    o0 = rms_ref(leaves0[0], leaves0[1], leaves0[2], group_size=group_size)
    g0 = torch.autograd.grad((o0 * go.float()).sum(), leaves0)
    v = y.float() * torch.nn.functional.silu(z.float())
    rstd = torch.rsqrt(v.reshape(3000, -1, group_size).pow(2).mean(-1) + 1e-5).contiguous()
    for sch in bwd_schedules(group_size):
        poison()
        dy, dz, dw = rmsnorm_gated_bwd(y, z, w, rstd, go, group_size, False, schedule=sch)
        errs = {"dy": rel(dy, g0[0]), "dz": rel(dz, g0[1]), "dweight": rel(dw, g0[2])}
        assert all(e < 1e-2 for e in errs.values()), f"{sch}: " + fmt(errs)
