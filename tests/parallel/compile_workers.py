"""Rank functions for tests/parallel/test_compile_parallel.py: the parallel build with
trainer.compile (each residual block compiled) against the same build eager."""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import state
from parallel.engine import Engine
from pretrain.config import load_config, validate
from workers import BASE, _rel, _slice, make_batch


def _train(cfg, derived, steps: int) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Per step the dp-mean cross-entropy; the first step's gradients of this rank's parameters; the
    number of this rank's residual blocks that run compiled."""
    torch.manual_seed(cfg.run.seed)
    eng = Engine(cfg, derived, torch.device("cpu"), parallel=True)
    compiled = sum(getattr(block, "_compiled_call_impl", None) is not None
                   for chunk in eng.chunks for block in chunk.blocks())
    dp, mb = state.dp_size(), cfg.data.micro_batch_size
    losses, grads = [], {}
    for step in range(steps):
        batch = _slice(make_batch(step, mb * dp, cfg.data.seq_len, cfg.model.vocab_size), state.dp_rank(), dp)
        if eng.pipeline:
            ce = eng.forward_backward_microbatches([batch])
        else:
            ce = eng.forward_backward(batch, 1.0).clone()
        if step == 0:
            eng.finalize_grads()
            grads = {n: p.main_grad.detach().clone() for n, p in eng.model.named_parameters()}
        eng.step(1e-3)
        dist.all_reduce(ce, group=state.dp_group())
        losses.append(float(ce) / dp)
    return losses, grads, compiled


def compiled_vs_eager(rank: int, world: int, cases: list[tuple[list[str], int]]) -> list[dict]:
    out = []
    for overrides, steps in cases:
        results = {}
        for compiled in (False, True):
            cfg = load_config([], BASE + list(overrides) + [f"trainer.compile={str(compiled).lower()}"])
            derived = validate(cfg, world)
            state.initialize(cfg, derived)
            results[compiled] = _train(cfg, derived, steps)
            state.destroy()
            dist.barrier()
        (eager_losses, eager_grads, eager_blocks), (comp_losses, comp_grads, comp_blocks) = results[False], results[True]
        out.append({"losses": eager_losses, "losses_compiled": comp_losses, "compiled_blocks": (eager_blocks, comp_blocks),
                    "grad_err": {n: _rel(comp_grads[n], g) for n, g in eager_grads.items()}})
    return out
