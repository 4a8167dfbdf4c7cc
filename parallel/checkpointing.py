"""The model's sharded state dict for megatron-core dist_checkpointing, built from the shard specs.

Contract (what pretrain/checkpoint.py relies on):
- `HybridLM.sharded_state_dict(prefix="")` returns {state-dict key: ShardedTensor | ShardedTensorFactory}
  for every parameter and persistent buffer (e.g. the MoE `gate.expert_bias`), with or without
  process groups (tp = 1 included), in both builds: the single-process model (pretrain/layers) writes the
  same keys and shapes, so a checkpoint of one build loads into the other. Keys are the module's
  state-dict keys (`layers.3.mixer.in_proj.weight`).
- Checkpoint keys and global shapes never depend on tp (nor, later, pp/ep): a tensor of one part is
  one ShardedTensor of its global shape, cut along its tp axis; a tensor packed from several parts
  (Mamba's in_proj: z, x, B, C, dt; conv_weight / conv_bias: x, B, C) is a ShardedTensorFactory that
  saves one ShardedTensor per part under `<key>.<part>` (global shape of that part) and concatenates
  the local pieces again on load. So a tp2 checkpoint loads at tp1 and back.
- replica_id = (tp replica, pp replica, dp x cp rank): exactly one rank saves each piece (parameters
  are replicated over dp and cp; pp replica 1 marks the last pipeline stage's copy of tied
  embeddings). Expert weights are keyed by their global expert index (`experts.{j}.*`) and use the
  expert-data-parallel rank, so an ep2 checkpoint loads at ep1 and back.
- DistributedOptimizer.sharded_state_dict(model.sharded_state_dict(), ...) works with it (tests/parallel).
- Load: `sd = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir); model.load_state_dict(sd,
  strict=False)` (megatron's linears add empty `_extra_state` entries on their own).
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import state
from parallel.common import Part, Spec, local_parts, set_spec, spec_of


def _sharded_tensor(key: str, local: torch.Tensor, dim: int, part: Part, dp_rank: int, pp_replica: int = 0):
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = [(dim, part.index, part.num_parts)] if part.num_parts > 1 else []
    return ShardedTensor.from_rank_offsets(key, local, *offsets, replica_id=(part.replica, pp_replica, dp_rank))


def _factory(key: str, tensor: torch.Tensor, spec: Spec, dp_rank: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def build(key, data, replica_id, flattened_range=None):
        if flattened_range is not None:
            raise NotImplementedError("flattened ranges are not supported for multi-part tensors")
        return [_sharded_tensor(f"{key}.{part.name}", piece, spec.dim, part, dp_rank)
                for part, piece in local_parts(data, spec)]

    def merge(pieces):
        return torch.cat(pieces, dim=spec.dim)

    return ShardedTensorFactory(key, tensor, build, merge, replica_id=(0, 0, dp_rank))


def _annotate_single_process_mamba(module: nn.Module) -> None:
    """The single-process Mamba-2 mixer (pretrain/layers/mamba.py) packs the same parts as the parallel
    one; give its packed tensors the tp=1 specs, so both builds write the same keys and shapes."""
    from pretrain.layers.mamba import Mamba2Mixer

    for mixer in module.modules():
        if not isinstance(mixer, Mamba2Mixer) or hasattr(mixer.conv_weight, "_hp_spec"):
            continue
        d_inner, bc, nh = mixer.d_inner, mixer.num_groups * mixer.d_state, mixer.num_heads
        whole = [Part(name, size, 1, 0) for name, size in (("z", d_inner), ("x", d_inner), ("B", bc), ("C", bc),
                                                           ("dt", nh))]
        packed = [(mixer.in_proj.weight, whole), (mixer.in_proj.bias, whole),
                  (mixer.conv_weight, whole[1:4]), (mixer.conv_bias, whole[1:4])]
        for tensor, parts in packed:
            if tensor is not None:
                set_spec(tensor, 0, *parts)


def sharded_state_dict(module: nn.Module, prefix: str = "") -> dict:
    dp_rank, expert_dp_rank = state.dp_cp_rank(), state.expert_dp_rank()
    _annotate_single_process_mamba(module)
    tensors = dict(module.named_parameters())
    persistent = module.state_dict(keep_vars=True)
    tensors.update({name: buf for name, buf in module.named_buffers() if name in persistent})
    out = {}
    for name, tensor in tensors.items():
        key = prefix + name
        spec = spec_of(tensor)
        data = tensor  # the Parameter itself: the distributed optimizer maps its state through it
        # expert weights (one key per global expert index) are replicated over expert-dp only
        replica_rank = expert_dp_rank if getattr(tensor, "_hp_expert", False) else dp_rank
        if len(spec.parts) == 1:
            # pp_replica 1: the last pipeline stage's copy of tied embeddings (parallel/model.py)
            out[key] = _sharded_tensor(key, data, spec.dim, spec.parts[0], replica_rank,
                                       getattr(tensor, "_hp_pp_replica", 0))
        else:
            out[key] = _factory(key, data, spec, replica_rank)
    return out
