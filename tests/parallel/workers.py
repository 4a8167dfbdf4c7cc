"""Rank functions for tests/parallel (spawned by tests/distributed/spawn.py).

Each case builds the sharded model (from the same seed as the single-process reference, so both
start from identical weights), runs one micro-batch per dp rank and compares loss and every
gradient with the reference run over the whole global batch (the dp slices as accumulated
micro-batches), then trains both for a number of steps and returns both loss curves.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from parallel import state
from parallel.common import shard_full, spec_of
from parallel.engine import Engine
from pretrain.config import load_config, validate
from pretrain.schedule import lr_at

BASE = [
    "data.path=unused", "model.d_model=32", "model.vocab_size=64", "model.pattern=M*-E",
    "model.mamba.num_heads=4", "model.mamba.head_dim=8", "model.mamba.num_groups=2", "model.mamba.d_state=8",
    "model.mamba.chunk_size=8", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mlp.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ff=24",
    "model.moe.num_shared_experts=1", "data.seq_len=16", "data.micro_batch_size=2",
    "optim.lr=3e-3", "optim.warmup_steps=2", "optim.grad_clip=1.0", "trainer.max_steps=20", "run.seed=7",
]


def make_batch(step: int, batch: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    seq_idx = torch.zeros(batch, seq_len, dtype=torch.int32)
    seq_idx[:, seq_len // 2 + step % 3:] = 1  # two packed documents per row
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": seq_idx}


def _slice(batch: dict, i: int, n: int) -> dict:
    size = next(iter(batch.values())).shape[0] // n
    return {k: v[i * size:(i + 1) * size] for k, v in batch.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the Frobenius norm (max-abs errors of A_log's tiny, cancelling gradients
    reach 1e-5 from summation order alone)."""
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def dp_loss_error(ce: torch.Tensor, ce_ref: float) -> float:
    """Relative error of the dp mean of each rank's step loss `ce` against the reference's (collective over dp)."""
    dist.all_reduce(ce, group=state.dp_group())
    return abs(float(ce) / state.dp_size() - ce_ref) / abs(ce_ref)


def grad_limit(rtol: float, ref_fp32_err: float) -> float:
    """The bound on a parallel gradient's relative difference from the single-process float32 one:
    rtol, or where float32 itself is less accurate (A_log's small, cancelling sums) 8x float32's own
    error against float64. For a cancelling sum, float32's error depends on the order of the terms
    (here: sums split over ranks and shapes) and the reference's error is one draw of it, which can
    be a small one. Observed on an AMD EPYC CPU (MKL takes other kernels than on Intel): A_log at
    3.1x (tp2) and 5.0x (tp2_pp2_sp), all at ~2e-5 relative; a parallelism bug shows as >= 1e-3."""
    return max(rtol, 8 * ref_fp32_err)


def gradient_errors(named_params, ref: Engine, ref64: Engine) -> tuple[dict, dict]:
    """Per parameter of this rank (name, param with megatron's main_grad): the relative error of its
    gradient against the float32 reference's (cut to this rank's piece), and float32's own accuracy
    (the float32 reference against the float64 one)."""
    ref_params, ref64_params = dict(ref.model.named_parameters()), dict(ref64.model.named_parameters())
    grad_err, ref_err = {}, {}
    for name, p in named_params:
        expected = shard_full(ref_params[name].grad, spec_of(p))
        grad_err[name] = _rel(p.main_grad.float(), expected)
        ref_err[name] = _rel(expected.double(), shard_full(ref64_params[name].grad, spec_of(p)))
    return grad_err, ref_err


def starve_expert(eng, expert: int = 3) -> None:
    """A sigmoid router bias that keeps `expert` from ever being chosen (scores are in (0, 1))."""
    for layer in eng.model.moe_layers():
        layer.gate.expert_bias[expert] = -100.0


PREPARE = {"starve_expert_3": starve_expert}


def _engine(cfg, derived, cpu, prepare: str | None, **kwargs) -> Engine:
    torch.manual_seed(cfg.run.seed)
    eng = Engine(cfg, derived, cpu, **kwargs)
    if prepare:
        PREPARE[prepare](eng)
    return eng


def norm_of_ones(engine: Engine) -> float:
    """The engine's global gradient norm (clipped_norm_step, as in a training step) when every local
    gradient element is 1: the square root of the number of elements of the whole model exactly when
    each element counts once, whatever is split or replicated over tp, dp, cp, ep or pp."""
    from parallel.grads import clipped_norm_step

    engine.zero_grad()
    for p in engine.model.parameters():
        p.main_grad.fill_(1.0)
    _, norm = clipped_norm_step(engine.optimizer.optimizer, list(engine.model.parameters()), 0.0)
    engine.zero_grad()
    return float(norm)


def check_ones_norm(name: str, result: dict) -> None:
    """A case's norm_of_ones against the single-process model's element count (see norm_of_ones)."""
    counted = result["ones_norm"] ** 2
    assert abs(counted / result["ref_elements"] - 1) < 1e-6, (name, "elements counted in the grad norm", counted,
                                                             "model elements", result["ref_elements"])


def run_case(rank: int, world: int, overrides: list[str], steps: int, prepare: str | None = None) -> dict:
    """prepare: a name in PREPARE applied to both models after they are built (same change to both)."""
    cfg = load_config([], BASE + list(overrides))
    derived = validate(cfg, world)
    state.initialize(cfg, derived)
    dp, dpr = state.dp_size(), state.dp_rank()
    cpu = torch.device("cpu")
    mb, seq_len, vocab = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size

    par = _engine(cfg, derived, cpu, prepare, parallel=True, distributed_optimizer=False)
    ref = _engine(cfg, derived, cpu, prepare, parallel=False)

    # one step: loss and every gradient
    batch = make_batch(0, mb * dp, seq_len, vocab)
    ce_ref = sum(float(ref.forward_backward(_slice(batch, i, dp), 1.0 / dp)) for i in range(dp)) / dp
    par.zero_grad()
    ce = par.forward_backward(_slice(batch, dpr, dp), 1.0).clone()
    par.finalize_grads()
    loss_err = dp_loss_error(ce, ce_ref)
    # float32's own accuracy: the reference against a float64 run of the same model and data
    ref64 = _engine(cfg, derived, cpu, prepare, parallel=False)
    ref64.model.double()
    for i in range(dp):
        ref64.forward_backward(_slice(batch, i, dp), 1.0 / dp)
    grad_err, ref_err = gradient_errors(par.model.named_parameters(), ref, ref64)
    del ref64
    del par

    # training: the distributed optimizer against torch AdamW on one process
    ref.zero_grad()
    ref = _engine(cfg, derived, cpu, prepare, parallel=False)
    par = _engine(cfg, derived, cpu, prepare, parallel=True, distributed_optimizer=True)
    curve, curve_ref, norms, norms_ref = [], [], [], []
    loads, loads_ref, dropped, dropped_ref = [], [], [], []
    for step in range(steps):
        lr = lr_at(step, steps, cfg.optim)
        batch = make_batch(step, mb * dp, seq_len, vocab)
        ce = par.forward_backward(_slice(batch, dpr, dp), 1.0).clone()
        norms.append(float(par.step(lr)))
        loads.append([x.tolist() for x in par.update_expert_bias()])
        dropped.append([x.tolist() for x in par.take_dropped_tokens()])
        dist.all_reduce(ce, group=state.dp_group())
        curve.append(float(ce) / dp)
        curve_ref.append(sum(float(ref.forward_backward(_slice(batch, i, dp), 1.0 / dp)) for i in range(dp)) / dp)
        norms_ref.append(float(ref.step(lr)))
        loads_ref.append([x.tolist() for x in ref.update_expert_bias()])
        dropped_ref.append([x.tolist() for x in ref.take_dropped_tokens()])
    counts = par.model.num_parameters()
    megatron_routers = _routes_with_megatron(par)
    ones_norm = norm_of_ones(par)
    state.destroy()
    return {"loss_err": loss_err, "grad_err": grad_err, "ref_fp32_err": ref_err, "curve": curve, "curve_ref": curve_ref,
            "num_parameters": counts, "ref_num_parameters": ref.model.num_parameters(),
            "grad_norm": norms, "grad_norm_ref": norms_ref, "moe_load": loads, "moe_load_ref": loads_ref,
            "moe_dropped": dropped, "moe_dropped_ref": dropped_ref,
            "routed_slots_per_step": mb * dp * seq_len * cfg.model.moe.top_k,
            "ones_norm": ones_norm, "ref_elements": sum(p.numel() for p in ref.model.parameters()),
            "megatron_routers": megatron_routers}


def _routes_with_megatron(eng: Engine) -> bool:
    """Every MoE layer of the parallel build routes with megatron-core's TopKRouter."""
    from megatron.core.transformer.moe.router import TopKRouter

    layers = eng.model.moe_layers()
    return bool(layers) and all(isinstance(layer.gate, TopKRouter) for layer in layers)


def run_cases(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """cases: (overrides, steps) or (overrides, steps, prepare)."""
    return [run_case(rank, world, *case) for case in cases]


def _tensors(eng) -> dict:
    tensors = dict(eng.model.named_parameters())
    for layer in eng.model.moe_layers():
        name = next(n for n, m in eng.model.named_modules() if m is layer)
        tensors[f"{name}.gate.expert_bias"] = layer.gate.expert_bias
    return tensors


def save_and_reload(rank: int, world: int, ckpt_dir: str, save_overrides: list[str], load_overrides: list[str]) -> dict:
    """Train 2 steps with `save_overrides`, save model + distributed optimizer with dist_checkpointing;
    rebuild with `load_overrides` (another tp), load both, and return both runs' pieces with their specs."""
    from megatron.core import dist_checkpointing


    out = {}
    for phase, overrides in (("saved", save_overrides), ("loaded", load_overrides)):
        cfg = load_config([], BASE + list(overrides))
        derived = validate(cfg, world)
        state.initialize(cfg, derived)
        torch.manual_seed(cfg.run.seed + (0 if phase == "saved" else 1))  # different init: loading must overwrite
        eng = Engine(cfg, derived, torch.device("cpu"), parallel=True)
        dp = state.dp_size()
        mb, seq_len, vocab = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
        if phase == "saved":
            for step in range(2):
                eng.forward_backward(_slice(make_batch(step, mb * dp, seq_len, vocab), state.dp_rank(), dp), 1.0)
                eng.step(1e-3)
                eng.update_expert_bias()
            model_sd = eng.model.sharded_state_dict()
            sd = {"model": model_sd, "optimizer": eng.optimizer.sharded_state_dict(model_sd)}
            os.makedirs(ckpt_dir, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(sd, ckpt_dir)
            out["saved"] = {k: (v.detach().clone(), spec_of(v)) for k, v in _tensors(eng).items()}
        else:
            model_sd = eng.model.sharded_state_dict()
            sd = {"model": model_sd, "optimizer": eng.optimizer.sharded_state_dict(model_sd, is_loading=True)}
            loaded = dist_checkpointing.load(sd, ckpt_dir)
            eng.model.load_state_dict(loaded["model"], strict=False)
            out["loaded_before_step"] = {k: v.detach().clone() for k, v in loaded["model"].items() if torch.is_tensor(v)}
            eng.optimizer.load_state_dict(loaded["optimizer"])
        # the same next step in both layouts: the resharded Adam state must give the same update
        eng.forward_backward(_slice(make_batch(5, mb * dp, seq_len, vocab), state.dp_rank(), dp), 1.0)
        eng.step(1e-3)
        out[phase + "_after_step"] = {k: (v.detach().clone(), spec_of(v)) for k, v in _tensors(eng).items()}
        del eng
        state.destroy()
        dist.barrier()
    return out


def cpu_compat_report() -> dict:
    """What parallel.cpu_compat did in this (CPU-only) process."""
    from parallel import cpu_compat

    return {"patched": list(cpu_compat.PATCHED), "installed": cpu_compat.installed(),
            "current_device": str(torch.cuda.current_device()), "cuda_available": torch.cuda.is_available()}


def two_rank_launch(rank: int, world: int, cases: list, ckpt_dir: str) -> dict:
    return {"cases": run_cases(rank, world, cases),
            "reload": save_and_reload(rank, world, ckpt_dir, *RELOAD_CASE),
            "cpu_compat": cpu_compat_report()}


# saved at tp=2 with ngroups=1 < tp (B/C replicated) and kv heads 1 < tp, loaded at tp=1 x dp=2
# (no clipping: with replicated B/C and k/v rows megatron's grad norm at tp=2 differs, see parallel/README.md)
RELOAD_CASE = (["parallel.tp=2", "model.mamba.num_groups=1", "model.attention.num_kv_heads=1", "optim.grad_clip=0"],
               ["data.micro_batch_size=1", "data.global_batch_size=2", "model.mamba.num_groups=1",
                "model.attention.num_kv_heads=1", "optim.grad_clip=0"])
