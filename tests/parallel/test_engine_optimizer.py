"""The megatron engine's inner torch Adam runs fused where build_optimizer's does
(CheckpointableOptimizer.prefer_fused_adam), with the same updates as torch's foreach Adam."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from parallel.engine import CheckpointableOptimizer


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(4, generator=g))]


def _adam(params, **kw):
    return torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                             lr=1e-2, **kw)


def test_fused_switch_gives_foreach_updates_and_moves_loaded_steps():
    params, ref = _params(0), _params(0)
    leaf = SimpleNamespace(optimizer=_adam(params), grad_scaler=None)  # as megatron builds it: no options
    wrapped = CheckpointableOptimizer(leaf)
    ref_opt = _adam(ref, foreach=True)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, q, gr in zip(params, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if step == 2:  # a checkpoint load leaves float64 CPU steps, shared by a param group
            shared = torch.tensor(2.0, dtype=torch.float64)
            for st in leaf.optimizer.state.values():
                st["step"] = shared
            wrapped._unshare_steps()
        # the CPU stands in for CUDA here: torch's fused Adam runs on both
        wrapped.prefer_fused_adam(fused_devices=("cpu",))
        assert all(grp["fused"] is True and grp["foreach"] is False for grp in leaf.optimizer.param_groups)
        assert all(st["step"].dtype == torch.float32 for st in leaf.optimizer.state.values())
        leaf.optimizer.step()
        ref_opt.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # float32, another kernel's rounding
    assert all(float(st["step"]) == 4.0 for st in leaf.optimizer.state.values())


def test_foreach_where_parameters_are_not_on_a_fused_device():
    leaf = SimpleNamespace(optimizer=_adam(_params(0)), grad_scaler=None)
    CheckpointableOptimizer(leaf).prefer_fused_adam()  # default: CUDA only; these are CPU tensors
    assert all(grp["fused"] is None and grp["foreach"] is True for grp in leaf.optimizer.param_groups)
