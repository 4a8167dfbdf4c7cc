"""Rank functions for tests/parallel/test_context.py (spawned by tests/distributed/spawn.py).

Every case: the context-parallel model (same seed, so the same weights as the single-process
reference) runs one micro-batch per dp replica whose packed documents cross the cp shard boundaries
(and the tp shard boundaries under sequence parallelism); loss and every gradient are compared with
the single-process run on the whole batch, then both train for a number of steps (megatron DDP +
distributed optimizer against torch AdamW) and both loss curves are returned. Saved activations of
one forward are measured per rank against the single-process model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import state
from parallel.engine import Engine
from pretrain.config import load_config, validate
from pretrain.loss import IGNORE_INDEX
from pretrain.schedule import lr_at
from workers import BASE, _slice, dp_loss_error, gradient_errors, norm_of_ones

CP_BASE = BASE + ["data.seq_len=32"]


def crossing_batch(step: int, batch: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    """Rows of 4 packed documents; the third spans the middle of the sequence (the cp=2 shard
    boundary) and the second the first quarter's end (the tp2 x cp2 sequence-parallel boundary);
    a few labels are ignored (-100), unevenly over the shards."""
    g = torch.Generator().manual_seed(2000 + step)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    seq_idx = torch.zeros(batch, seq_len, dtype=torch.int32)
    quarter, half = seq_len // 4, seq_len // 2
    for row in range(batch):
        starts = (quarter - 3 + (row + step) % 3, half - 5 + row % 3, seq_len - 4)
        for start in starts:
            seq_idx[row, start:] += 1
    labels = tokens[:, 1:].clone()
    labels[0, 2] = IGNORE_INDEX
    labels[-1, half + 1: half + 4] = IGNORE_INDEX
    return {"tokens": tokens[:, :-1], "labels": labels, "seq_idx": seq_idx}


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward + loss, parameters
    excluded (what activation memory is)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(batch["tokens"], batch["labels"], batch["seq_idx"])
    del loss
    return sum(storages.values())


def run_cp_case(rank: int, world: int, overrides: list[str], steps: int) -> dict:
    cfg = load_config([], CP_BASE + list(overrides))
    derived = validate(cfg, world)
    state.initialize(cfg, derived)
    dp, dpr = state.dp_size(), state.dp_rank()
    cpu = torch.device("cpu")
    mb, seq_len, vocab = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    layout = {"cp": state.cp_size(), "cp_rank": state.cp_rank(), "tp": state.tp_size(), "dp": dp}

    torch.manual_seed(cfg.run.seed)
    par = Engine(cfg, derived, cpu, parallel=True, distributed_optimizer=False)
    torch.manual_seed(cfg.run.seed)
    ref = Engine(cfg, derived, cpu, parallel=False)

    # one step: loss and every gradient (every cp rank of a replica gets the replica's whole rows)
    batch = crossing_batch(0, mb * dp, seq_len, vocab)
    ce_ref = sum(float(ref.forward_backward(_slice(batch, i, dp), 1.0 / dp)) for i in range(dp)) / dp
    par.zero_grad()
    ce = par.forward_backward(_slice(batch, dpr, dp), 1.0).clone()
    par.finalize_grads()
    loss_err = dp_loss_error(ce, ce_ref)
    torch.manual_seed(cfg.run.seed)
    ref64 = Engine(cfg, derived, cpu, parallel=False)
    ref64.model.double()
    for i in range(dp):
        ref64.forward_backward(_slice(batch, i, dp), 1.0 / dp)
    grad_err, ref_err = gradient_errors(par.model.named_parameters(), ref, ref64)
    del ref64

    # saved activations of one forward: this rank at cp (x tp) against the single process
    one = _slice(batch, dpr, dp)
    memory = {"parallel": saved_activation_bytes(par.model, one), "single": saved_activation_bytes(ref.model, one)}
    del par

    # training: megatron DDP + distributed optimizer against torch AdamW on one process
    torch.manual_seed(cfg.run.seed)
    ref = Engine(cfg, derived, cpu, parallel=False)
    torch.manual_seed(cfg.run.seed)
    par = Engine(cfg, derived, cpu, parallel=True, distributed_optimizer=True)
    curve, curve_ref, loads, loads_ref = [], [], [], []
    for step in range(steps):
        lr = lr_at(step, steps, cfg.optim)
        batch = crossing_batch(step, mb * dp, seq_len, vocab)
        ce = par.forward_backward(_slice(batch, dpr, dp), 1.0).clone()
        par.step(lr)
        loads.append([load.tolist() for load in par.update_expert_bias()])
        dist.all_reduce(ce, group=state.dp_group())
        curve.append(float(ce) / dp)
        curve_ref.append(sum(float(ref.forward_backward(_slice(batch, i, dp), 1.0 / dp)) for i in range(dp)) / dp)
        ref.step(lr)
        loads_ref.append([load.tolist() for load in ref.update_expert_bias()])
    ones_norm = norm_of_ones(par)
    state.destroy()
    return {"layout": layout, "loss_err": loss_err, "grad_err": grad_err, "ref_fp32_err": ref_err,
            "curve": curve, "curve_ref": curve_ref, "moe_load": loads, "moe_load_ref": loads_ref, "memory": memory,
            "ones_norm": ones_norm, "ref_elements": sum(p.numel() for p in ref.model.parameters())}


def run_cp_cases(rank: int, world: int, cases: list[tuple[list[str], int]]) -> list[dict]:
    return [run_cp_case(rank, world, overrides, steps) for overrides, steps in cases]


def memory_at_length(rank: int, world: int, overrides: list[str], seq_len: int) -> dict:
    """Saved-activation bytes of one forward at a longer sequence: this rank's vs the single process."""
    from pretrain.model import HybridLM

    cfg = load_config([], CP_BASE + list(overrides) + [f"data.seq_len={seq_len}", "data.micro_batch_size=1",
                                                       "data.global_batch_size=1"])
    derived = validate(cfg, world)
    state.initialize(cfg, derived)
    torch.manual_seed(cfg.run.seed)
    par = HybridLM(cfg.model, derived, parallel=True)
    torch.manual_seed(cfg.run.seed)
    ref = HybridLM(cfg.model, derived, parallel=False)
    batch = crossing_batch(0, 1, seq_len, cfg.model.vocab_size)
    out = {"parallel": saved_activation_bytes(par, batch), "single": saved_activation_bytes(ref, batch),
           "cp": state.cp_size(), "tp": state.tp_size()}
    state.destroy()
    return out


def launch(rank: int, world: int, cases: list[tuple[list[str], int]], memory_cases: list[tuple[list[str], int]]) -> dict:
    return {"cases": run_cp_cases(rank, world, cases),
            "memory": [memory_at_length(rank, world, overrides, seq_len) for overrides, seq_len in memory_cases]}
