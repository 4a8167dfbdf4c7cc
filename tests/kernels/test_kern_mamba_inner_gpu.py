"""GPU checks of the fused Mamba mixer core (kernels.mamba_inner; pytest -m gpu; skipped without CUDA).

bf16: the fused node against the same Triton kernels run as separate ops (conv, SSD, gated norm on
views of the packed projection, autograd joining the gradients with cats): the same output and
gradient bits, with and without the recompute hints, every output written (poisoned memory first),
nothing NaN; and against the float32 PyTorch reference on the same bf16 inputs: relative error
< 2e-2 (the bf16 path rounds three intermediates, the conv output, the SSD output and its output
gradient, to bf16, ~4e-3 relative each; the separate ops' own bf16 tests hold 1e-2 one op at a time).
"""
import pytest
import torch

from bench.mamba_core import separate_ops
from kernels.mamba_inner import reference as inner_ref
from kernels.mamba_inner.op import MambaDims, mamba_inner
from test_kern_gpu import poison, rel, seq_idx_random  # noqa: E402  (this folder)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = ("zxbcdt", "conv_weight", "conv_bias", "dt_bias", "A", "D", "norm_weight")


def inputs(batch, seqlen, dims):
    dev = "cuda"
    leaves = [torch.randn(batch, seqlen, dims.packed_dim, device=dev).to(torch.bfloat16),
              torch.randn(dims.conv_dim, 4, device=dev) * 0.5, torch.randn(dims.conv_dim, device=dev) * 0.1,
              torch.randn(dims.nheads, device=dev) * 0.1 - 2, -torch.rand(dims.nheads, device=dev) - 0.2,
              torch.randn(dims.nheads, device=dev), 1 + 0.1 * torch.randn(dims.d_inner, device=dev)]
    return [t.requires_grad_(True) for t in leaves]


def kwargs(dims, seq_idx, before):
    return dict(dims=dims, chunk_size=256, dt_limit=(0.0, float("inf")), norm_eps=1e-5, norm_before_gate=before,
                seq_idx=seq_idx)


# (batch, seqlen, dims): 4 heads per group (the dB/dC head split may sum partials), and hybrid_1b3's
# mixer (64 heads x 64, one group, dstate 128)
SHAPES = [(2, 1000, MambaDims(8, 64, 2, 64)), (1, 2048, MambaDims(64, 64, 1, 128))]


@pytest.mark.parametrize("batch,seqlen,dims", SHAPES)
@pytest.mark.parametrize("before,recompute", [(False, False), (True, True)])
def test_mamba_inner_same_bits_as_separate_ops_bf16(batch, seqlen, dims, before, recompute):
    leaves = inputs(batch, seqlen, dims)
    seq_idx = seq_idx_random(batch, seqlen)
    kw = kwargs(dims, seq_idx, before)
    hints = dict(recompute_conv=recompute, recompute_states=recompute)
    seed = torch.randn(batch, seqlen, dims.d_inner, device="cuda")
    poison()
    out = mamba_inner(*leaves, **kw, **hints)
    grads = torch.autograd.grad((out.float() * seed).sum(), leaves)
    poison()
    out_sep = separate_ops(*leaves, **kw, **hints)
    grads_sep = torch.autograd.grad((out_sep.float() * seed).sum(), leaves)
    assert torch.equal(out, out_sep)
    differ = [k for k, a, b in zip(NAMES, grads, grads_sep) if not torch.equal(a, b)]
    assert not differ, differ
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("batch,seqlen,dims", SHAPES)
def test_mamba_inner_bf16_vs_fp32_reference(batch, seqlen, dims):
    leaves = inputs(batch, seqlen, dims)
    seq_idx = seq_idx_random(batch, seqlen)
    kw = kwargs(dims, seq_idx, False)
    seed = torch.randn(batch, seqlen, dims.d_inner, device="cuda").to(torch.bfloat16)
    out = mamba_inner(*leaves, **kw)
    grads = torch.autograd.grad((out * seed).sum(), leaves)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    out_ref = inner_ref.mamba_inner(*ref_leaves, **kw)
    grads_ref = torch.autograd.grad((out_ref * seed.float()).sum(), ref_leaves)
    errs = {"out": rel(out, out_ref), **{f"d{k}": rel(a, b) for k, a, b in zip(NAMES, grads, grads_ref)}}
    assert all(v < 2e-2 for v in errs.values()), errs
