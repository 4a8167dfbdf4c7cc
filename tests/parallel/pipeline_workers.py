"""Rank functions for tests/parallel/test_pipeline.py (spawned by tests/distributed/spawn.py).

Each case builds this pipeline rank's model chunks (from the same seed as the single-process
reference, so both start from identical weights), runs one optimizer step's micro-batches of each
dp rank through megatron-core's pipeline schedule and compares the loss, every gradient this rank
holds and the MoE loads with the single-process run over the whole global batch (micro-batches as
accumulated gradient steps), then trains both and returns both loss and grad-norm curves.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from parallel import state
from parallel.common import spec_of
from parallel.engine import Engine
from pretrain.config import load_config, validate
from pretrain.schedule import lr_at
from workers import BASE, _tensors, dp_loss_error, gradient_errors, make_batch, norm_of_ones


def step_batches(step: int, cfg, dp: int, dp_rank: int, accum: int) -> tuple[list[dict], list[list[dict]]]:
    """(this dp rank's micro-batches, every dp rank's micro-batches) of one optimizer step."""
    mb, seq_len, vocab = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    per_rank = [[] for _ in range(dp)]
    for i in range(accum):
        batch = make_batch(step * accum + i, mb * dp, seq_len, vocab)
        for r in range(dp):
            per_rank[r].append({k: v[r * mb:(r + 1) * mb] for k, v in batch.items()})
    return per_rank[dp_rank], per_rank


def _reference_step(ref: Engine, per_rank: list[list[dict]]) -> float:
    """The global batch's mean cross-entropy, gradients accumulated as mean over all micro-batches."""
    batches = [b for rank in per_rank for b in rank]
    return sum(float(ref.forward_backward(b, 1.0 / len(batches))) for b in batches) / len(batches)


def run_case(rank: int, world: int, overrides: list[str], steps: int) -> dict:
    cfg = load_config([], BASE + list(overrides))
    derived = validate(cfg, world)
    state.initialize(cfg, derived)
    dp, dpr, accum = state.dp_size(), state.dp_rank(), derived.grad_accum_steps
    cpu = torch.device("cpu")

    torch.manual_seed(cfg.run.seed)
    par = Engine(cfg, derived, cpu, parallel=True, distributed_optimizer=False)
    torch.manual_seed(cfg.run.seed)
    ref = Engine(cfg, derived, cpu, parallel=False)
    layer_names = sorted({name.split(".")[1] for chunk in par.chunks for name, _ in chunk.named_parameters()
                          if name.startswith("layers.")}, key=int)

    # one step: loss and every gradient of this rank's layers
    mine, per_rank = step_batches(0, cfg, dp, dpr, accum)
    ce_ref = _reference_step(ref, per_rank)
    par.zero_grad()
    ce = par.forward_backward_microbatches(mine).clone()
    par.finalize_grads()
    loss_err = dp_loss_error(ce, ce_ref)
    torch.manual_seed(cfg.run.seed)
    ref64 = Engine(cfg, derived, cpu, parallel=False)
    ref64.model.double()
    _reference_step(ref64, [[{k: v for k, v in b.items()} for b in r] for r in per_rank])
    grad_err, ref_err = gradient_errors((np for chunk in par.chunks for np in chunk.named_parameters()), ref, ref64)
    del ref64, par

    # training: distributed optimizer + pipeline schedule against torch AdamW on one process
    torch.manual_seed(cfg.run.seed)
    ref = Engine(cfg, derived, cpu, parallel=False)
    torch.manual_seed(cfg.run.seed)
    par = Engine(cfg, derived, cpu, parallel=True, distributed_optimizer=True)
    curve, curve_ref, norms, norms_ref, loads, loads_ref = [], [], [], [], [], []
    for step in range(steps):
        lr = lr_at(step, steps, cfg.optim)
        mine, per_rank = step_batches(step, cfg, dp, dpr, accum)
        ce = par.forward_backward_microbatches(mine).clone()
        norms.append(float(par.step(lr)))
        loads.append([load.tolist() for load in par.update_expert_bias()])
        dist.all_reduce(ce, group=state.dp_group())
        curve.append(float(ce) / dp)
        curve_ref.append(_reference_step(ref, per_rank))
        norms_ref.append(float(ref.step(lr)))
        loads_ref.append([load.tolist() for load in ref.update_expert_bias()])
    result = {"loss_err": loss_err, "grad_err": grad_err, "ref_fp32_err": ref_err, "curve": curve,
              "curve_ref": curve_ref, "grad_norm": norms, "grad_norm_ref": norms_ref, "moe_load": loads,
              "moe_load_ref": loads_ref, "num_parameters": par.model.num_parameters(),
              "ref_num_parameters": ref.model.num_parameters(), "layers": layer_names,
              "pp_rank": state.pp_rank(), "chunks": len(par.chunks),
              "ref_names": sorted(name for name, _ in ref.model.named_parameters()),
              "ones_norm": norm_of_ones(par), "ref_elements": sum(p.numel() for p in ref.model.parameters())}
    state.destroy()
    return result


def run_cases(rank: int, world: int, cases: list[tuple[list[str], int]]) -> list[dict]:
    return [run_case(rank, world, overrides, steps) for overrides, steps in cases]


def save_pp_and_reload(rank: int, world: int, ckpt_dir: str, save_overrides: list[str],
                       load_overrides: list[str]) -> dict:
    """Train 2 steps with `save_overrides` (pp > 1), save the model with dist_checkpointing, rebuild with
    `load_overrides` (pp = 1) from another seed and load; returns both runs' tensors with their specs."""
    from megatron.core import dist_checkpointing

    out = {}
    for phase, overrides in (("saved", save_overrides), ("loaded", load_overrides)):
        cfg = load_config([], BASE + list(overrides))
        derived = validate(cfg, world)
        state.initialize(cfg, derived)
        torch.manual_seed(cfg.run.seed + (0 if phase == "saved" else 1))  # different init: loading must overwrite
        eng = Engine(cfg, derived, torch.device("cpu"), parallel=True)
        model_sd = eng.model.sharded_state_dict()
        if phase == "saved":
            for step in range(2):
                mine, _ = step_batches(step, cfg, state.dp_size(), state.dp_rank(), derived.grad_accum_steps)
                eng.forward_backward_microbatches(mine)
                eng.step(1e-3)
                eng.update_expert_bias()
            os.makedirs(ckpt_dir, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save({"model": model_sd}, ckpt_dir)
            out["saved"] = {k: (v.detach().clone(), spec_of(v)) for k, v in _tensors(eng).items()}
            out["saved_keys"] = sorted(model_sd)
        else:
            loaded = dist_checkpointing.load({"model": model_sd}, ckpt_dir)
            eng.model.load_state_dict(loaded["model"], strict=False)
            out["loaded"] = {k: (v.detach().clone(), spec_of(v)) for k, v in _tensors(eng).items()}
            out["loaded_keys"] = sorted(model_sd)
        del eng
        state.destroy()
        dist.barrier()
    return out


def two_rank_launch(rank: int, world: int, cases: list, ckpt_dir: str, reload_case) -> dict:
    from megatron.core.pipeline_parallel import schedules

    from parallel.cpu_compat import _CpuFactoriesTorch

    return {"cases": run_cases(rank, world, cases), "reload": save_pp_and_reload(rank, world, ckpt_dir, *reload_case),
            "schedules_torch_stand_in": isinstance(schedules.torch, _CpuFactoriesTorch)}
