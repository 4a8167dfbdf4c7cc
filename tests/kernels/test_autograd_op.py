"""kernels/_autograd_op.with_autograd on a small custom op with two outputs (one not differentiable)
and optional arguments, like the kernels' forward ops: the eager path (an autograd.Function around
the op) and register_autograd's path (the op called directly with gradients on) give the same
outputs and gradients, exactly (the same backward function runs); with gradients off the op runs
alone; under torch.compile (fullgraph) the op's registered autograd is what is traced and the
gradients still match."""
from __future__ import annotations

import torch

from kernels._autograd_op import with_autograd


@torch.library.custom_op("hybrid_pretrain_test::scaled_square", mutates_args=(),
                         schema="(Tensor x, Tensor? w, float scale, bool flag) -> (Tensor, Tensor)")
def _op(x, w, scale, flag):
    y = scale * x * x * (w if w is not None else 1.0)
    return y, (x * x).sum(-1)  # the second output is not differentiable, like an rstd


@_op.register_fake
def _(x, w, scale, flag):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1])


def _setup(ctx, inputs, output):
    x, w, scale, flag = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w)
    ctx.scale = scale


def _backward(ctx, dy, _dsecond):
    x, w = ctx.saved_tensors
    wv = w if w is not None else 1.0
    dx = 2 * ctx.scale * x * wv * dy
    dw = (ctx.scale * x * x * dy).sum(0) if w is not None else None
    return dx, dw, None, None


_call = with_autograd(_op, _backward, _setup)


def _grads(fn, x, w):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y, second = fn(x, w, 0.5, True)
    (y * torch.arange(y.shape[-1], dtype=y.dtype)).sum().backward()
    return y.detach(), second, x.grad, w.grad


def test_eager_path_is_the_autograd_function_and_matches_register_autograd():
    x, w = torch.randn(5, 7), torch.randn(7)
    xg = x.clone().requires_grad_(True)
    y, second = _call(xg, w, 0.5, True)
    assert type(y.grad_fn).__name__.startswith("scaled_square_autograd")
    assert not second.requires_grad
    ours, registered = _grads(_call, x, w), _grads(_op, x, w)
    for a, b in zip(ours, registered):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours[2], 2 * 0.5 * x * w * torch.arange(7.0), rtol=1e-6, atol=1e-6)


def test_no_grad_runs_the_op_alone():
    with torch.no_grad():
        y, _ = _call(torch.randn(3, 4, requires_grad=True), None, 2.0, False)
    assert y.grad_fn is None


def test_compiled_call_traces_the_registered_autograd():
    x, w = torch.randn(5, 7), torch.randn(7)

    def f(x, w, scale, flag):
        return _call(x, w, scale, flag)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ours, eager = _grads(compiled, x, w), _grads(_call, x, w)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not type(_grads(compiled, x, w)[0]).__name__.startswith("scaled_square_autograd")


def test_any_stride_ops_carry_the_stride_order_tag():
    """The Mamba core's and the gated norm's ops let Inductor keep its own strides (in eager's order)
    instead of copying their inputs: the tag must reach each registered op (a sequence of tags, the
    form every torch release the project runs on accepts)."""
    import kernels.mamba_inner.triton_op  # noqa: F401  (registers the ops)
    import kernels.rmsnorm_gated.triton_op  # noqa: F401

    for name in ("mamba_inner_fwd", "mamba_inner_bwd", "rmsnorm_gated_fwd", "rmsnorm_gated_bwd"):
        op = getattr(torch.ops.hybrid_pretrain, name).default
        assert torch.Tag.needs_fixed_stride_order in op.tags, name
