"""Read a training checkpoint (megatron dist_checkpointing, torch_dist) for export: offline, one CPU
process, whatever tp/pp/ep/dp layout saved it.

The checkpoint contract (parallel/checkpointing.py): every model tensor is stored under its HybridLM
state-dict name with its global shape, except tensors packed from parts (Mamba's in_proj: z, x, B, C,
dt; conv_weight / conv_bias: x, B, C), stored as `<name>.<part>` with each part's global shape and
concatenated along dim 0. So we ask dist_checkpointing for full tensors by those keys (its metadata
names them), concatenate the parts in that order, and check every shape against the single-process
model built from the checkpoint's own config.yaml. A private 1-rank gloo group stands in for the
world (pretrain.checkpoint.ensure_process_group); nothing of the saving layout is needed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import Config, ParallelConfig, from_yaml_text, validate

PART_ORDER = ("z", "x", "B", "C", "dt")  # the packing order of in_proj (conv: x, B, C), dim 0


class CheckpointReadError(RuntimeError):
    """The checkpoint cannot be read for export; the message names the directory or file."""


def is_training_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "common.pt").is_file()


def load_training_checkpoint(step_dir: str | Path, verify: bool = True) -> tuple[Config, dict[str, torch.Tensor]]:
    """(the run's config, full CPU tensors by HybridLM state-dict name) of one checkpoint directory."""
    import warnings

    import torch.distributed as dist

    with warnings.catch_warnings():  # megatron-core announces its fallbacks without TransformerEngine/Apex
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

    from pretrain.checkpoint import ensure_process_group
    from pretrain.checkpoint_files import verify_checkpoint
    from pretrain.model import HybridLM

    step = Path(step_dir)
    if verify:
        problems = verify_checkpoint(step)
        if problems:
            raise CheckpointReadError(f"checkpoint {step} is incomplete or corrupt: " + "; ".join(problems[:5]))
    config_file = step / "config.yaml"
    if not config_file.is_file():
        raise CheckpointReadError(f"{config_file} not found (every checkpoint holds its resolved config)")
    cfg = from_yaml_text(config_file.read_text())
    single = from_yaml_text(config_file.read_text())
    single.parallel = ParallelConfig()
    single.data.path = single.data.path or "unused"
    single.data.global_batch_size = single.data.micro_batch_size
    expected = HybridLM(single.model, validate(single, world_size=1), parallel=False).state_dict()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*load_state_dict.* is deprecated", category=FutureWarning)
        try:
            meta = dist_checkpointing.load_tensors_metadata(str(step))
        except Exception as err:  # megatron raises assorted types for unreadable metadata
            raise CheckpointReadError(f"cannot read the metadata of checkpoint {step}: {type(err).__name__}: {err}") from err
        template, parts_of, missing = {}, {}, []
        for name in expected:
            keys = [name] if name in meta else [f"{name}.{p}" for p in PART_ORDER if f"{name}.{p}" in meta]
            if not keys:
                missing.append(name)
                continue
            parts_of[name] = keys
            for key in keys:
                template[key] = ShardedTensor.from_rank_offsets(
                    key, torch.empty(meta[key].global_shape, dtype=meta[key].dtype), replica_id=0)
        if missing:
            raise CheckpointReadError(f"checkpoint {step} lacks model tensors {missing[:8]}"
                                      + (" ..." if len(missing) > 8 else "") + f" (its model: {config_file})")
        created = ensure_process_group()
        try:
            loaded = dist_checkpointing.load(template, str(step))
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointReadError(f"cannot read the model from checkpoint {step}: {type(err).__name__}: {err}") from err
        finally:
            if created:
                dist.destroy_process_group()
    state = {}
    for name, keys in parts_of.items():
        tensor = torch.cat([loaded[k] for k in keys], dim=0) if len(keys) > 1 else loaded[keys[0]]
        if tensor.shape != expected[name].shape:
            raise CheckpointReadError(f"checkpoint {step}: {name} has shape {tuple(tensor.shape)}, the model in "
                                      f"{config_file} needs {tuple(expected[name].shape)}")
        state[name] = tensor.detach().cpu().contiguous()
    return cfg, state
