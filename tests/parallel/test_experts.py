"""parallel.experts.GroupedExperts without process groups: the matmul loop against per-expert MLPs,
an expert with zero tokens still in the autograd graph, and (GPU) torch's grouped GEMM against the loop,
also inside the single-process MoE under bf16 autocast (pretrain/layers/grouped_mlp.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from parallel.experts import GroupedExperts  # noqa: E402
from pretrain.layers.grouped_mlp import grouped_mm_dtype  # noqa: E402

D_MODEL, D_FF = 32, 64


def _experts(activation: str, num: int = 4, seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    experts = GroupedExperts(D_MODEL, D_FF, activation, range(num))
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return experts


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_loop_matches_each_expert_and_keeps_empty_experts_in_the_graph(activation):
    experts = _experts(activation)
    counts = [5, 0, 3, 0]  # experts 1 and 3 get no tokens
    x = torch.randn(sum(counts), D_MODEL, requires_grad=True)
    y = experts(x, counts)
    pieces = x.split(counts)
    expected = torch.cat([experts[j](pieces[j]) for j in range(4)])
    torch.testing.assert_close(y, expected)
    # megatron's DDP registers a hook on every parameter's gradient accumulator: count the calls
    seen = set()
    for name, p in experts.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: seen.add(name))
    y.square().sum().backward()
    assert seen == {name for name, _ in experts.named_parameters()}
    for j in (1, 3):
        for p in experts[j].parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_counts_must_cover_the_tokens():
    experts = _experts("relu2")
    with pytest.raises(ValueError, match="do not split 4 tokens over 4 experts"):
        experts(torch.randn(4, D_MODEL), [1, 1, 1, 0])


def test_global_expert_names():
    experts = GroupedExperts(D_MODEL, D_FF, "relu2", range(2, 4))
    assert sorted(n for n, _ in experts.named_parameters()) == [
        "2.down_proj.weight", "2.up_proj.weight", "3.down_proj.weight", "3.up_proj.weight"]
    assert experts[3] is experts.local()[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_grouped_mm_matches_the_loop(activation):
    experts = _experts(activation).cuda().to(torch.bfloat16)
    counts = [96, 0, 160, 32]
    x = torch.randn(sum(counts), D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert grouped_mm_dtype(x, experts.local()) == torch.bfloat16
    y = experts(x, counts)
    grads = torch.autograd.grad(y.float().square().sum(), [x, *experts.parameters()])
    # reference: the loop in float32 on the same bf16 values
    ref = _experts(activation).cuda()
    ref.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    x32 = x.detach().float().requires_grad_()
    y32 = torch.cat([ref[j](piece) for j, piece in enumerate(x32.split(counts))])
    grads32 = torch.autograd.grad(y32.square().sum(), [x32, *ref.parameters()])
    assert (y.float() - y32).norm() / y32.norm() < 2e-2
    for g, g32 in zip(grads, grads32):
        assert (g.float() - g32).norm() <= 2e-2 * g32.norm() + 1e-6
    assert all(torch.count_nonzero(g) == 0 for g, (n, _) in zip(grads[1:], experts.named_parameters())
               if n.startswith("1."))  # expert 1 got no tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_single_process_moe_grouped_under_autocast_matches_float32(capacity_factor, activation):
    """The single-process MoE (fp32 weights, bf16 autocast: the trainer's one-GPU path) takes the
    grouped GEMM; its output and gradients match the same module in float32 (the matmul loop) to bf16
    accuracy, with and without slots dropped over capacity. relu2: autocast runs torch.square in float32,
    so the down projection gets a float32 input (a bug found by tests/pretrain/test_compile.py on GPU)."""
    from pretrain.config import MoEConfig
    from pretrain.layers.moe import MoE

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, d_ff=128, activation=activation, router="softmax_aux",
                    capacity_factor=capacity_factor)
    moe = MoE(64, cfg, shared_d_ff=0).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 256, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert grouped_mm_dtype(x, list(moe.experts)) == torch.bfloat16
        y = moe(x)
    grads = torch.autograd.grad(y.float().square().sum(), list(moe.parameters()))
    assert grouped_mm_dtype(x, list(moe.experts)) is None  # float32 outside autocast: the loop
    y32 = moe(x)
    grads32 = torch.autograd.grad(y32.square().sum(), list(moe.parameters()))
    assert (y.float() - y32).norm() / y32.norm() < 2e-2
    for g, g32 in zip(grads, grads32):
        assert (g.float() - g32).norm() <= 2e-2 * g32.norm() + 1e-6
