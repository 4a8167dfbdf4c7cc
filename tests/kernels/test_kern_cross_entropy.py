"""kernels.cross_entropy: the reference against autograd of the loss it differentiates (float64), and the
Triton kernel against the reference under the CPU interpreter (float32) and on a GPU (bf16 logits).

Loss per row r: row_scale_r (lse_r - logits_{r,y_r} + c lse_r^2); the in-place gradient must equal its
autograd gradient. Tolerances: float64 1e-12 (rounding only); the interpreter in float32 1e-5 relative
(different summation order over the vocabulary: online vs two-pass max/sum); bf16 logits on the GPU:
the gradient is rounded once to bf16 (relative step 2^-8 = 3.9e-3), lse and the target logit are float32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.cross_entropy.reference import cross_entropy_rows as ce_ref

HERE = Path(__file__).resolve().parent


def make_inputs(rows, vocab, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    target = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    scale = torch.rand(rows, generator=gen, dtype=torch.float64)
    scale[::3] = 0  # unlabelled rows
    return logits, target, scale.to(torch.float32 if dtype != torch.float64 else dtype).to(device)


def autograd_rows(logits, target, scale, coeff):
    x = logits.detach().double().requires_grad_(True)
    lse = torch.logsumexp(x, dim=-1)
    tgt = x.gather(1, target[:, None]).squeeze(1)
    loss = (scale.double() * (lse - tgt + coeff * lse.square())).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return lse.detach(), tgt.detach(), grad


@pytest.mark.parametrize("coeff", [0.0, 1e-4])
def test_reference_gradient_is_autograds(coeff):
    logits, target, scale = make_inputs(37, 301, torch.float64)
    lse0, tgt0, grad0 = autograd_rows(logits, target, scale, coeff)
    lse, tgt = ce_ref(logits, target, scale, coeff)
    assert torch.allclose(lse, lse0, rtol=1e-12, atol=0)
    assert torch.equal(tgt, tgt0)
    assert torch.allclose(logits, grad0, rtol=1e-12, atol=1e-15)
    assert (logits[::3] == 0).all()  # row_scale 0: no gradient


def test_reference_without_grad_leaves_logits():
    logits, target, scale = make_inputs(5, 64, torch.float32)
    before = logits.clone()
    lse, _ = ce_ref(logits, target, scale, 0.0, want_grad=False)
    assert torch.equal(logits, before)
    assert torch.allclose(lse, torch.logsumexp(before, -1), rtol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="target"):
        ce_ref(torch.zeros(4, 8), torch.zeros(3, dtype=torch.long), torch.zeros(4))


INTERP_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {here!r})
from test_kern_cross_entropy import make_inputs
from kernels.cross_entropy.reference import cross_entropy_rows as ref
from kernels.cross_entropy import op
import kernels
out = {{}}
for name, rows, vocab, coeff in (("one_block", 7, 300, 0.0), ("three_blocks_zloss", 5, 20000, 1e-4)):
    logits, target, scale = make_inputs(rows, vocab, torch.float32, seed=1)
    expect = logits.clone()
    assert kernels.use_triton(logits)
    lse, tgt = op.cross_entropy_rows(logits, target, scale, coeff)
    lse0, tgt0 = ref(expect, target, scale, coeff)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    out[name] = dict(lse=rel(lse, lse0), tgt=rel(tgt, tgt0), grad=rel(logits, expect))
print("JSON:" + json.dumps(out))
"""


def test_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(HERE.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", INTERP_SCRIPT.format(here=str(HERE))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("JSON:", 1)[1])
    assert set(res) == {"one_block", "three_blocks_zloss"}
    for case, errs in res.items():
        assert all(err <= 1e-5 for err in errs.values()), (case, errs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_on_gpu_matches_reference(dtype):
    from kernels.cross_entropy import triton_op

    logits, target, scale = make_inputs(4096, 50304, dtype, device="cuda")
    expect = logits.clone()
    lse, tgt = triton_op.cross_entropy_rows(logits, target, scale, 1e-4)
    lse0, tgt0 = ce_ref(expect, target, scale, 1e-4)
    assert torch.allclose(lse, lse0, rtol=2e-6, atol=0)
    assert torch.equal(tgt, tgt0)
    # each gradient element is rounded once to the logits' dtype by both
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6  # one bf16 ulp is 2^-8..2^-7 relative
    err = (logits.float() - expect.float()).abs()
    assert (err <= step * expect.float().abs() + 1e-6).all(), float(err.max())  # +: the label term cancels
