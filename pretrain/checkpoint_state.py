"""What goes into a checkpoint and back: sharded state dicts for megatron dist_checkpointing.

A checkpoint's state dict (the nesting is ours; ShardedTensor keys are global and layout-independent):

    model        ShardedTensors of every parameter and persistent buffer (MoE router expert_bias too)
    optimizer    ShardedTensors of the optimizer state (exp_avg, exp_avg_sq, ...) + hyperparameters
    rng          one ShardedObject per rank: python, numpy, torch CPU, CUDA and megatron tracker states
    trainer      step, consumed samples and tokens, total steps (the LR schedule is a function of step)
    data         the streaming loader's state_dict (global: the same on every rank)
    layout       world size and tp/pp/ep/cp/dp of the run that saved
    config_yaml  the resolved config;  versions  code and library versions

The model and optimizer go through one function each that prefers the parallel code's own
`model.sharded_state_dict()` / `optimizer.sharded_state_dict(model_sd)` (megatron-core layers and
distributed optimizer: tp/pp/ep-independent keys, global shapes) and falls back to treating every
tensor as replicated (plain torch modules and torch optimizers).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("pretrain")

REPO = Path(__file__).resolve().parents[1]
OPTIMIZER_SHARDING = "fully_reshardable"  # megatron DistributedOptimizer checkpoint format


# ----------------------------------------------------------------------------------------------- versions
@functools.lru_cache(maxsize=1)
def code_versions() -> dict:
    """Versions of this code (git commit, dirty flag) and of the libraries a checkpoint depends on."""
    out = {"python": platform.python_version()}
    for dist in ("hybrid-pretrain", "torch", "megatron-core", "mosaicml-streaming", "numpy", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


# ----------------------------------------------------------------------------------------------- model
def _has_own_sharded_state_dict(module) -> bool:
    return callable(getattr(module, "sharded_state_dict", None))


def unwrap_model(model):
    """The module that owns sharded_state_dict/load_state_dict (through DDP-style `.module` wrappers)."""
    while not _has_own_sharded_state_dict(model) and hasattr(model, "module"):
        model = model.module
    return model


def model_sharded_state_dict(model, replica_id: int) -> dict:
    """ShardedTensors of the model. The parallel model provides its own; plain modules: every tensor
    replicated (only the rank with replica_id 0 writes it)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    inner = unwrap_model(model)
    if _has_own_sharded_state_dict(inner):
        return inner.sharded_state_dict()
    return {name: ShardedTensor.from_rank_offsets(name, tensor.detach(), replica_id=replica_id)
            for name, tensor in inner.state_dict().items()}


def load_model_state(model, state: dict) -> None:
    inner = unwrap_model(model)
    result = inner.load_state_dict(state, strict=False)
    missing = [k for k in getattr(result, "missing_keys", []) if not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"checkpoint lacks model tensors {missing}")


# ----------------------------------------------------------------------------------------------- optimizer
def _param_names(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_sharded_state_dict(optimizer, model, model_sd: dict, replica_id: int, *,
                                 is_loading: bool = False, saved_meta: dict | None = None) -> dict:
    """The optimizer's part. A megatron (distributed) optimizer provides its own; for a torch optimizer
    every per-parameter tensor of parameter shape becomes a replicated ShardedTensor
    `optimizer.state.<name>.<param key>`, the rest (step counts, hyperparameters) stays common.

    is_loading: build a template (zeros where the optimizer has no state yet) of the tensors that
    `saved_meta` (the checkpoint's common optimizer entry) says were saved."""
    if callable(getattr(optimizer, "sharded_state_dict", None)):
        # megatron maps optimizer state to model tensors by id(ShardedTensor.data): it must be the Parameter
        params = dict(unwrap_model(model).named_parameters())
        bound = {k: dataclasses.replace(v, data=params[k]) if k in params and getattr(v, "data", None) is not params[k]
                 else v for k, v in model_sd.items()}
        # fully_reshardable: canonical per-parameter state (gathered on dp rank 0 at save), so a checkpoint
        # loads under another tp/pp/dp layout; megatron's default (fully_sharded_model_space) writes
        # flattened ranges that the torch_dist format of 0.16.1 rejects, and dp_reshardable fixes tp/pp
        if is_loading:
            _init_megatron_optimizer_state(optimizer)
        # mem_efficient: gather on dp rank 0 only, over megatron's gloo dp group (also what works on CPU)
        return optimizer.sharded_state_dict(bound, is_loading=is_loading, metadata={
            "distrib_optim_sharding_type": OPTIMIZER_SHARDING, "distrib_optim_fully_reshardable_mem_efficient": True})
    from megatron.core.dist_checkpointing import ShardedTensor

    names = _param_names(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors, scalars = {}, {}
    if is_loading:
        keys_by_param = (saved_meta or {}).get("tensor_keys", {})
        for name, p in zip(names, params):
            for key in keys_by_param.get(name, []):
                tensors.setdefault(name, {})[key] = ShardedTensor.from_rank_offsets(
                    f"optimizer.state.{key}.{name}", torch.zeros_like(p), replica_id=replica_id)
        return {"tensors": tensors}
    tensor_keys = {}
    for name, p in zip(names, params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape and value.ndim > 0:
                tensors.setdefault(name, {})[key] = ShardedTensor.from_rank_offsets(
                    f"optimizer.state.{key}.{name}", value.detach(), replica_id=replica_id)
                tensor_keys.setdefault(name, []).append(key)
            else:
                scalars.setdefault(name, {})[key] = value.item() if torch.is_tensor(value) else value
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    meta = {"kind": type(optimizer).__name__, "param_names": names, "tensor_keys": tensor_keys,
            "scalars": scalars, "param_groups": groups}
    return {"tensors": tensors, "meta": meta}


def _init_megatron_optimizer_state(optimizer) -> None:
    """A megatron optimizer that has not stepped yet has no torch state, and its state_dict() (which
    sharded_state_dict(is_loading=True) calls) needs one 'step' per parameter: zeros stand in until the
    checkpoint's values are loaded over them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if len(st) == 0:
                    on_device = bool(group.get("fused") or group.get("capturable"))
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer, model, loaded: dict, saved_meta: dict | None) -> None:
    if callable(getattr(optimizer, "sharded_state_dict", None)):
        optimizer.load_state_dict(loaded)
        return
    meta = saved_meta or {}
    names = _param_names(model, optimizer)
    if meta.get("param_names") and list(meta["param_names"]) != names:
        raise ValueError("the optimizer's parameters differ from the checkpoint's "
                         f"({len(names)} now, {len(meta['param_names'])} saved)")
    current = optimizer.state_dict()
    state = {}
    for idx, name in enumerate(names):
        entry = {}
        for key, value in meta.get("scalars", {}).get(name, {}).items():
            entry[key] = torch.tensor(value, dtype=torch.float32) if key == "step" else value
        for key, value in loaded.get("tensors", {}).get(name, {}).items():
            entry[key] = value
        if entry:
            state[idx] = entry
    groups = current["param_groups"]
    for group, saved in zip(groups, meta.get("param_groups", [])):
        group.update({k: v for k, v in saved.items() if k in group and k != "params"})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "tracker": None}
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        if tracker.is_initialized():
            state["tracker"] = tracker.get_states()
    except Exception:  # megatron's tracker absent or not set up: nothing to keep
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded_object(rank: int, world_size: int, state: dict | None):
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("rng_state", state, (world_size,), (rank,), replica_id=0)


# ----------------------------------------------------------------------------------------------- layout
def layout_of(cfg, derived) -> dict:
    p = cfg.parallel
    return {"world_size": derived.world_size, "tp": p.tp, "pp": p.pp, "ep": p.ep, "cp": p.cp, "dp": derived.dp,
            "virtual_pp": p.virtual_pp, "sequence_parallel": p.sequence_parallel}


def describe_layout(layout: dict) -> str:
    return " ".join(f"{k}={layout.get(k)}" for k in ("tp", "pp", "ep", "cp", "dp"))
