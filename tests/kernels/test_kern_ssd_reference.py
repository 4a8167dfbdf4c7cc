"""The chunked SSD reference (kernels.ssd.reference.ssd_scan) against the naive recurrence.

Both run in float64 on fresh random inputs, so agreement to ~1e-10 relative checks the
block decomposition itself (not rounding); gradients are compared the same way.
"""

import math

import pytest
import torch

from kernels.ssd.reference import ssd_scan, ssd_scan_sequential


def random_seq_idx(batch, seqlen, ndocs_max=4):
    """Non-decreasing document indices with random (unaligned) boundaries."""
    rows = []
    for _ in range(batch):
        cuts = torch.randint(1, seqlen, (torch.randint(0, ndocs_max, ()).item(),))
        row = torch.zeros(seqlen, dtype=torch.int32)
        for c in cuts.tolist():
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


def make_inputs(batch=2, seqlen=37, nheads=4, headdim=5, ngroups=2, dstate=6, dtype=torch.float64,
                D_shape="h", with_z=True, with_bias=True, with_init=True, with_seq=True, grad=False):
    g = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    t = dict(
        x=g(batch, seqlen, nheads, headdim),
        dt=g(batch, seqlen, nheads) - 1.0,
        A=-torch.rand(nheads, dtype=dtype) * 2 - 0.1,
        B=g(batch, seqlen, ngroups, dstate),
        C=g(batch, seqlen, ngroups, dstate),
    )
    opt = {}
    if D_shape == "h":
        opt["D"] = g(nheads)
    elif D_shape == "hp":
        opt["D"] = g(nheads, headdim)
    if with_z:
        opt["z"] = g(batch, seqlen, nheads, headdim)
    if with_bias:
        opt["dt_bias"] = g(nheads) * 0.5
    if with_init:
        opt["initial_states"] = g(batch, nheads, headdim, dstate)
    if grad:
        for v in list(t.values()) + list(opt.values()):
            v.requires_grad_(True)
    if with_seq:
        opt["seq_idx"] = random_seq_idx(batch, seqlen)
    return t, opt


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "seqlen,chunk,ngroups,D_shape,with_seq,with_init,limit",
    [
        (37, 8, 2, "h", True, True, (0.0, math.inf)),
        (64, 16, 1, "hp", True, False, (0.0, math.inf)),
        (50, 16, 4, None, False, True, (0.05, 2.0)),
        (5, 16, 2, "h", True, True, (0.0, math.inf)),  # shorter than one chunk
        (33, 1, 2, "hp", True, True, (0.0, 0.5)),  # chunk of one: every boundary at a chunk edge
    ],
)
def test_chunked_matches_sequential(seqlen, chunk, ngroups, D_shape, with_seq, with_init, limit):
    t, opt = make_inputs(seqlen=seqlen, ngroups=ngroups, D_shape=D_shape, with_seq=with_seq, with_init=with_init)
    y, fs = ssd_scan(**t, **opt, chunk_size=chunk, dt_limit=limit, return_final_states=True)
    y0, fs0 = ssd_scan_sequential(**t, **opt, dt_limit=limit, return_final_states=True)
    assert y.dtype == torch.float64 and y.shape == t["x"].shape
    assert fs.shape == (2, 4, 5, 6)
    assert rel(y, y0) < 1e-10
    assert rel(fs, fs0) < 1e-10


def test_no_softplus_no_options():
    t, _ = make_inputs(seqlen=29, ngroups=1)
    t["dt"] = t["dt"].abs() * 0.3
    y = ssd_scan(**t, chunk_size=8, dt_softplus=False)
    y0 = ssd_scan_sequential(**t, dt_softplus=False)
    assert rel(y, y0) < 1e-10


def test_seq_idx_resets_state():
    """Output of a later document must not depend on an earlier document's inputs."""
    t, opt = make_inputs(batch=1, seqlen=40, with_seq=False, with_init=True)
    seq = torch.zeros(1, 40, dtype=torch.int32)
    seq[:, 23:] = 1
    y = ssd_scan(**t, **opt, seq_idx=seq, chunk_size=16)
    t2 = {k: v.clone() for k, v in t.items()}
    for k in ("x", "B", "C", "dt"):
        t2[k][:, :23] = torch.randn_like(t2[k][:, :23])
    y2 = ssd_scan(**t2, **opt, seq_idx=seq, chunk_size=16)
    assert torch.equal(y[:, 23:], y2[:, 23:]) or rel(y[:, 23:], y2[:, 23:]) < 1e-12


def test_float32_dtype_and_accuracy():
    t, opt = make_inputs(seqlen=45, dtype=torch.float32)
    y, fs = ssd_scan(**t, **opt, chunk_size=16, return_final_states=True)
    assert y.dtype == torch.float32 and fs.dtype == torch.float32
    t64 = {k: v.double() for k, v in t.items()}
    opt64 = {k: (v.double() if v.is_floating_point() else v) for k, v in opt.items()}
    y0 = ssd_scan_sequential(**t64, **opt64)
    assert rel(y.double(), y0) < 1e-5  # float32 rounding only


def test_gradients_match_sequential():
    t, opt = make_inputs(seqlen=27, grad=True)
    leaves = {**t, **{k: v for k, v in opt.items() if k != "seq_idx"}}
    y, fs = ssd_scan(**t, **opt, chunk_size=8, dt_limit=(0.01, 3.0), return_final_states=True)
    gy, gs = torch.randn_like(y), torch.randn_like(fs)
    grads = torch.autograd.grad((y * gy).sum() + (fs * gs).sum(), list(leaves.values()))
    y0, fs0 = ssd_scan_sequential(**t, **opt, dt_limit=(0.01, 3.0), return_final_states=True)
    grads0 = torch.autograd.grad((y0 * gy).sum() + (fs0 * gs).sum(), list(leaves.values()))
    for name, g, g0 in zip(leaves, grads, grads0):
        assert rel(g, g0) < 1e-9, name


def test_gradcheck_small():
    t, opt = make_inputs(batch=1, seqlen=7, nheads=2, headdim=2, ngroups=1, dstate=3, grad=True)
    names = list(t) + [k for k in opt if k != "seq_idx"]
    seq = opt.pop("seq_idx")

    def f(*args):
        kw = dict(zip(names, args))
        return ssd_scan(**kw, seq_idx=seq, chunk_size=4, return_final_states=True)

    assert torch.autograd.gradcheck(f, tuple([t[k] for k in t] + [opt[k] for k in names[len(t):]]))


def test_bad_shapes_raise():
    t, _ = make_inputs(seqlen=8)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan(t["x"], t["dt"][:, :-1], t["A"], t["B"], t["C"], chunk_size=4)
