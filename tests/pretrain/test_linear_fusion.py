"""Gradient accumulation fusion (pretrain/layers/linear.py, trainer.gradient_accumulation_fusion):
the weight gradients summed inside the GEMM equal plain autograd's accumulated `.grad`.

CPU, float32: the fused layer against nn.Linear over several micro-batches (eager and under
torch.compile, where the in-place sum is a mutation in the backward graph), the recomputed linears
(mlp_act, mamba_norm), and whole engines with fusion on and off (every parameter's gradient, then
the step). float32 tolerances: the two paths sum the same products in another order (one addmm with
beta = 1 against a matmul and an add), a few float32 roundings: rtol 1e-5.
GPU (`-m gpu`): the cuBLAS GEMM with bf16 inputs, float32 output and beta = 1, in place, against a
float64 product; and the fused bf16 autocast path against plain autocast (which rounds each
micro-batch's weight gradient to bf16 before summing: bf16 tolerances).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.config import ConfigError, validate
from pretrain.layers.linear import FusedLinears, Linear, accumulate_wgrad_, fusion_enabled

from tests.pretrain.tiny_models import tiny_config


def _micro_batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulate_wgrad_adds_the_product_in_place(dtype):
    g = torch.Generator().manual_seed(1)
    acc = torch.randn(6, 5, generator=g, dtype=dtype)
    dy, x = torch.randn(11, 6, generator=g, dtype=dtype), torch.randn(11, 5, generator=g, dtype=dtype)
    want = acc.double() + dy.double().t() @ x.double()
    ptr = acc.data_ptr()
    accumulate_wgrad_(acc, dy, x)
    assert acc.data_ptr() == ptr
    torch.testing.assert_close(acc.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_accumulate_wgrad_names_a_shape_mismatch():
    with pytest.raises(ValueError, match=r"main_grad \(6, 5\) \+= grad_out \(11, 6\)\^T @ inp \(11, 4\)"):
        accumulate_wgrad_(torch.zeros(6, 5), torch.zeros(11, 6), torch.zeros(11, 4))


class _Pair(nn.Module):
    """Two linears with an activation between: (..., 8) -> (..., 8)."""

    def __init__(self, linear_cls, bias: bool):
        super().__init__()
        self.a = linear_cls(8, 12, bias=bias)
        self.b = linear_cls(12, 8, bias=bias)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


def _fused_and_plain(bias: bool, compiled: bool, device: str = "cpu") -> tuple[_Pair, _Pair]:
    """The same weights twice: fused Linears with zeroed buffers attached (compiled if asked), and
    plain nn.Linears."""
    torch.manual_seed(0)
    fused, plain = _Pair(Linear, bias).to(device), _Pair(nn.Linear, bias).to(device)
    plain.load_state_dict(fused.state_dict())
    if compiled:
        torch._dynamo.reset()
        fused.compile()
    for layer in (fused.a, fused.b):
        layer.main_grad = torch.zeros_like(layer.weight)
    return fused, plain


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fused_linear_sums_what_autograd_accumulates(compiled, bias):
    fused, plain = _fused_and_plain(bias, compiled)
    xs = _micro_batches(3, (2, 5, 8))
    for x in xs:
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused(xf).square().sum().backward()
        plain(xp).square().sum().backward()
        torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-5, atol=1e-6)
    for name in ("a", "b"):
        f, p = getattr(fused, name), getattr(plain, name)
        assert f.weight.grad is None  # autograd never saw the weight's gradient
        torch.testing.assert_close(f.main_grad, p.weight.grad, rtol=1e-5, atol=1e-6)
        if bias:
            torch.testing.assert_close(f.bias.grad, p.bias.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradients: the plain path, nothing summed
        before = fused.a.main_grad.clone()
        torch.testing.assert_close(fused(xs[0]), plain(xs[0]), rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.a.main_grad, before)


def _engine_grads(fusion: bool, *overrides: str, micro_batches: int = 3, steps: int = 1,
                  amp_dtype: torch.dtype | None = None):
    """(engine, every parameter's gradient at the last step, the parameters after it, the losses)."""
    from parallel.engine import Engine

    cfg = tiny_config("data.micro_batch_size=2", f"data.global_batch_size={2 * micro_batches}",
                      f"trainer.gradient_accumulation_fusion={str(fusion).lower()}", *overrides)
    torch.manual_seed(0)
    engine = Engine(cfg, validate(cfg, 1), torch.device("cpu"), amp_dtype)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        for _ in range(micro_batches):
            tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=g)
            seq_idx = (torch.arange(cfg.data.seq_len) >= 11).int().expand(2, -1).contiguous()  # two documents
            losses.append(float(engine.forward_backward(
                {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": seq_idx}, 1.0 / micro_batches)))
        if engine.fused_linears is not None:
            engine.fused_linears.release()
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
        engine.step(1e-3)
    return engine, grads, {n: p.detach().clone() for n, p in engine.model.named_parameters()}, losses


@pytest.mark.parametrize("recompute", ["none", "mlp_act,mamba_norm", "full"])
def test_engine_with_fusion_matches_plain_autograd(recompute):
    """Every parameter's gradient over 3 micro-batches, then the parameters after the step (AdamW)."""
    fused, fused_grads, fused_params, _ = _engine_grads(True, f"trainer.recompute={recompute}")
    plain, plain_grads, plain_params, _ = _engine_grads(False, f"trainer.recompute={recompute}")
    assert plain.fused_linears is None
    names = {n for n, m in fused.model.named_modules() if m in fused.fused_linears.layers}
    assert names and not any(".experts." in n for n in names)  # routed experts: grouped GEMMs, plain autograd
    assert any(n.endswith("in_proj") for n in names) and any(n.endswith("o_proj") for n in names)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in plain_params:
        torch.testing.assert_close(fused_params[name], plain_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(layer.main_grad is None and layer.weight.grad is None for layer in fused.fused_linears.layers)


@pytest.mark.parametrize("recompute", ["none", "mlp_act,mamba_norm"])
def test_engine_with_fusion_under_bf16_autocast(recompute):
    """CPU bf16 autocast, two optimizer steps of 3 micro-batches: the fused engine (each weight cast once
    per step, FusedLinears.attach) follows plain autocast within bf16 noise: plain rounds each
    micro-batch's weight gradient to bf16 (2^-9 relative), the fused sums do not. After the steps the
    copies are gone, and the next micro-batch casts the weights as the optimizer left them."""
    kw = {"steps": 2, "amp_dtype": torch.bfloat16}
    fused, fused_grads, _, fused_losses = _engine_grads(True, f"trainer.recompute={recompute}", **kw)
    _, plain_grads, _, plain_losses = _engine_grads(False, f"trainer.recompute={recompute}", **kw)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-2)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=5e-2, atol=2e-3, msg=name)
    layers = fused.fused_linears.layers
    assert all(layer.weight_copy is None and layer.main_grad is None for layer in layers)
    tokens = torch.randint(0, fused.cfg.model.vocab_size, (2, fused.cfg.data.seq_len + 1))
    fused.forward_backward({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": None}, 1.0)
    assert all(torch.equal(layer.weight_copy, layer.weight.detach().to(torch.bfloat16)) for layer in layers)


def test_the_step_copy_is_what_the_layer_multiplies_with():
    """Under bf16 autocast a layer with its step's copy attached multiplies with the copy, not a new
    cast of the weight (a doubled copy doubles the output); its recomputed-linear use does the same."""
    torch.manual_seed(0)
    pair = _Pair(Linear, False)
    layers = FusedLinears(pair)
    layers.attach(torch.bfloat16)
    assert all(layer.weight_copy.dtype == torch.bfloat16 for layer in layers.layers)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once = pair.a(x)
        pair.a.weight_copy = pair.a.weight_copy * 2
        twice = pair.a(x)
        from pretrain.recompute import linear_of_recomputed

        recomputed = linear_of_recomputed(lambda t, rerun=False: (torch.tanh(t), None), (x.requires_grad_(),), pair.a)
    torch.testing.assert_close(twice.float(), 2 * once.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(recomputed.float(), 2 * (pair.a.weight @ torch.tanh(x).t()).t().detach(),
                               rtol=2e-2, atol=1e-2)
    layers.release()
    assert pair.a.weight_copy is None and pair.a.main_grad is None


def test_fusion_is_refused_outside_the_single_process_engine():
    cfg = tiny_config("trainer.gradient_accumulation_fusion=true", "trainer.engine=megatron")
    with pytest.raises(ConfigError, match="trainer.gradient_accumulation_fusion"):
        validate(cfg, 1)
    cfg = tiny_config("trainer.gradient_accumulation_fusion=true", "data.global_batch_size=16")
    with pytest.raises(ConfigError, match="single-process engine only"):
        validate(cfg, 2)
    validate(tiny_config("data.global_batch_size=16"), 2)  # null (the default): fine anywhere


def test_fused_linears_refuse_low_precision_weights():
    model = _Pair(Linear, False).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64, not torch.bfloat16"):
        FusedLinears(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulate_wgrad_on_gpu_sums_in_float32_in_place(dtype):
    """The GEMM with a float32 output and beta = 1 into the same buffer: the float64 product of the
    same bf16/fp16 inputs plus the old sum, to float32 accumulation error (K = 4096 products)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    acc = torch.randn(384, 256, device="cuda", generator=g)
    dy = torch.randn(4096, 384, device="cuda", generator=g).to(dtype)
    x = torch.randn(4096, 256, device="cuda", generator=g).to(dtype)
    want = acc.double() + dy.double().t() @ x.double()
    ptr = acc.data_ptr()
    accumulate_wgrad_(acc, dy, x)
    assert acc.data_ptr() == ptr
    torch.testing.assert_close(acc.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_linear_under_bf16_autocast_on_gpu(compiled):
    """Fused against plain autocast over 4 micro-batches: the same outputs and input gradients (bf16
    rounding), and weight gradients within bf16 noise: plain rounds each micro-batch's weight gradient to
    bf16 (relative 2^-9) before its float32 sum, the fused GEMM does not."""
    fused, plain = _fused_and_plain(True, compiled, "cuda")
    for x in _micro_batches(4, (4, 256, 8)):
        xf, xp = x.cuda().requires_grad_(), x.cuda().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yf, yp = fused(xf), plain(xp)
        torch.testing.assert_close(yf, yp, rtol=1e-2, atol=1e-2)
        yf.float().square().sum().backward()
        yp.float().square().sum().backward()
        torch.testing.assert_close(xf.grad, xp.grad, rtol=2e-2, atol=1e-2)
    for name in ("a", "b"):
        f, p = getattr(fused, name), getattr(plain, name)
        torch.testing.assert_close(f.main_grad, p.weight.grad, rtol=2e-2, atol=1e-2)
        torch.testing.assert_close(f.bias.grad, p.bias.grad, rtol=2e-2, atol=1e-2)


def test_the_sum_runs_when_the_input_needs_no_gradient():
    """A fused layer fed by a tensor without gradient (a first layer): the weight's sum still happens."""
    torch.manual_seed(0)
    fused, plain = Linear(8, 4), nn.Linear(8, 4)
    plain.load_state_dict(fused.state_dict())
    fused.main_grad = torch.zeros_like(fused.weight)
    x = torch.randn(5, 8)
    fused(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(fused.main_grad, plain.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)


def test_the_default_fuses_on_cuda_when_a_step_accumulates():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fusion_enabled(None, cuda, 16) and not fusion_enabled(None, cuda, 1) and not fusion_enabled(None, cpu, 16)
    assert fusion_enabled(True, cpu, 1) and not fusion_enabled(False, cuda, 16)
