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
import re
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
ADAM_TENSORS = ("exp_avg", "exp_avg_sq")


def is_megatron_optimizer(optimizer) -> bool:
    return callable(getattr(optimizer, "sharded_state_dict", None))


def _megatron_entries(saved: dict) -> list[dict]:
    """A megatron optimizer's common part: one entry, or {0: ..., 1: ...} for a chain (MoE: dense and
    expert parameters have their own distributed optimizers)."""
    if "param_state_sharding_type" in saved:
        return [saved]
    return [saved[k] for k in sorted(saved)] if saved and all(isinstance(v, dict) for v in saved.values()) else []


def saved_optimizer_format(saved: dict | None) -> str | None:
    """"megatron" (distributed optimizer, fully reshardable), "torch" (single process) or None (no state)."""
    if not saved:
        return None
    entries = _megatron_entries(saved)
    if entries and all(e.get("param_state_sharding_type") == OPTIMIZER_SHARDING for e in entries):
        return "megatron"
    return "torch" if "meta" in saved else None


def _param_names(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _bind_to_params(model, model_sd: dict) -> dict:
    """megatron maps optimizer state to model tensors by id(ShardedTensor.data): it must be the Parameter."""
    params = dict(unwrap_model(model).named_parameters())
    return {k: dataclasses.replace(v, data=params[k]) if k in params and getattr(v, "data", None) is not params[k]
            else v for k, v in model_sd.items()}


PARAM_STATE_PREFIX = "optimizer.state.param."
CHAINED_PREFIX = re.compile(r"^chained_\d+\.")


def _as_single_process_template(tree):
    """A megatron load template for a single-process checkpoint. That checkpoint holds no fp32 main
    params (`optimizer.state.param.<key>`): those entries are left out and come from the model's
    tensors. Its keys have no `chained_<i>.` prefix (megatron's chain of dense and expert optimizers)."""
    if isinstance(tree, dict):
        return {k: _as_single_process_template(v) for k, v in tree.items()
                if not CHAINED_PREFIX.sub("", str(getattr(v, "key", ""))).startswith(PARAM_STATE_PREFIX)}
    key = getattr(tree, "key", None)
    if isinstance(key, str) and CHAINED_PREFIX.match(key):
        return dataclasses.replace(tree, key=CHAINED_PREFIX.sub("", key))
    return tree


def _saved_key_prefixes(saved_keys) -> dict[str, str]:
    """model key -> prefix of its Adam tensors in a megatron checkpoint ("" or "chained_<i>.");
    packed tensors are saved as parts (`<key>.z`), so each key's parent is recorded too."""
    out = {}
    for name in saved_keys:
        m = re.match(r"^((?:chained_\d+\.)?)optimizer\.state\.exp_avg\.(.+)$", name)
        if m:
            prefix, rest = m.groups()
            out.setdefault(rest, prefix)
            out.setdefault(rest.rsplit(".", 1)[0], prefix)
    return out


def _fill_main_params(template, loaded, model_tensors: dict) -> None:
    """Put the model's loaded tensors where the template has `optimizer.state.param.<key>` entries."""
    for k, v in template.items():
        key = getattr(v, "key", None)
        key = CHAINED_PREFIX.sub("", key) if isinstance(key, str) else key
        if isinstance(v, dict):
            _fill_main_params(v, loaded.setdefault(k, {}), model_tensors)
        elif isinstance(key, str) and key.startswith(PARAM_STATE_PREFIX):
            loaded[k] = model_tensors[key[len(PARAM_STATE_PREFIX):]]


def _megatron_template(optimizer, model, model_sd: dict, is_loading: bool) -> dict:
    # mem_efficient: gather on dp rank 0 only, over megatron's gloo dp group (also what works on CPU)
    return optimizer.sharded_state_dict(_bind_to_params(model, model_sd), is_loading=is_loading, metadata={
        "distrib_optim_sharding_type": OPTIMIZER_SHARDING, "distrib_optim_fully_reshardable_mem_efficient": True})


def optimizer_sharded_state_dict(optimizer, model, model_sd: dict, replica_id: int, *,
                                 is_loading: bool = False, saved: dict | None = None, saved_keys=()) -> dict:
    """The optimizer's part. Both builds write Adam's moments under megatron's keys,
    `optimizer.state.<exp_avg|exp_avg_sq>.<model key>`, with the model tensor's global shape and
    sharding (packed Mamba tensors as their named parts), so a checkpoint of either build loads into
    the other: the distributed optimizer (fully reshardable format: gathered over dp at save, so tp/pp/dp
    may change) provides its own; a torch optimizer's moments are wrapped like the model tensors, and
    its step counts and hyperparameters stay in the common part (`meta`).

    is_loading: a template for `saved`, the checkpoint's common optimizer entry (either format), whose
    tensor keys are `saved_keys` (a chain of megatron optimizers prefixes them `chained_<i>.`)."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    if is_megatron_optimizer(optimizer):
        if is_loading:
            _init_megatron_optimizer_state(optimizer)
        sd = _megatron_template(optimizer, model, model_sd, is_loading)
        return _as_single_process_template(sd) if is_loading and saved_optimizer_format(saved) == "torch" else sd
    names = _param_names(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    has_state = (saved_optimizer_format(saved) == "megatron" or bool((saved or {}).get("meta", {}).get("has_state"))
                 if is_loading else any(optimizer.state.get(p) for p in params))
    tensors = {}
    prefixes = _saved_key_prefixes(saved_keys) if is_loading else {}
    if has_state:
        for name, p in zip(names, params):
            for key in ADAM_TENSORS:
                value = torch.zeros_like(p) if is_loading else optimizer.state[p][key].detach()
                tensors.setdefault(name, {})[key] = make_sharded_optimizer_tensor(
                    model_sd[name], value, f"{prefixes.get(name, '')}optimizer.state.{key}")
    if is_loading:
        return {"tensors": tensors}
    steps = {name: float(optimizer.state[p]["step"]) for name, p in zip(names, params) if "step" in optimizer.state.get(p, {})}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    meta = {"kind": type(optimizer).__name__, "param_names": names, "has_state": has_state, "steps": steps,
            "param_groups": groups}
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


def _saved_step(saved: dict) -> float:
    """The Adam step count of a checkpoint of either format (one count: every parameter steps together)."""
    if saved_optimizer_format(saved) == "megatron":
        steps = [g.get("step", 0.0) for e in _megatron_entries(saved) for g in e["optimizer"]["param_groups"]]
    else:
        steps = list(saved["meta"].get("steps", {}).values())
    return float(max(steps, default=0.0))


def load_optimizer_state(optimizer, model, loaded: dict, saved: dict | None, model_tensors: dict) -> None:
    """Load `loaded` (the filled template) into the optimizer; `saved` is the checkpoint's common entry,
    `model_tensors` the model's loaded tensors (the fp32 main params of a single-process checkpoint)."""
    fmt = saved_optimizer_format(saved)
    if is_megatron_optimizer(optimizer):
        if fmt == "torch":  # a single-process checkpoint: megatron's common part, made from ours
            chained = getattr(optimizer, "chained_optimizers", [optimizer])
            template = _megatron_template(optimizer, model, model_sharded_state_dict(model, replica_id=0), True)

            def per_optimizer(tree):
                return [tree] if len(chained) == 1 else [tree[k] for k in sorted(k for k in tree if isinstance(k, int))]

            entries = []
            for opt, tpl, got in zip(chained, per_optimizer(template), per_optimizer(loaded)):
                groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": _saved_step(saved)}
                          for g in opt.optimizer.state_dict()["param_groups"]]
                _fill_main_params(tpl["param_state"], got["param_state"], model_tensors)
                entries.append({"optimizer": {"param_groups": groups}, "param_state": got["param_state"],
                                "param_state_sharding_type": OPTIMIZER_SHARDING})
            loaded = entries[0] if len(entries) == 1 else dict(enumerate(entries))
        optimizer.load_state_dict(loaded)
        return
    names = _param_names(model, optimizer)
    if fmt == "torch" and saved["meta"].get("param_names") and list(saved["meta"]["param_names"]) != names:
        raise ValueError("the optimizer's parameters differ from the checkpoint's "
                         f"({len(names)} now, {len(saved['meta']['param_names'])} saved)")
    current = optimizer.state_dict()
    state = {}
    tensors = loaded.get("tensors", {})
    if tensors:
        step = _saved_step(saved)
        for idx, name in enumerate(names):
            state[idx] = {"step": torch.tensor(step, dtype=torch.float32),
                          **{key: tensors[name][key] for key in ADAM_TENSORS}}
    if fmt == "torch":
        for group, saved_group in zip(current["param_groups"], saved["meta"].get("param_groups", [])):
            group.update({k: v for k, v in saved_group.items() if k in group and k != "params"})
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


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
