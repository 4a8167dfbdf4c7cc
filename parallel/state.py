"""Process groups from the config (megatron-core parallel_state), per-rank RNG seeding, teardown.

    initialize(cfg, derived)   # after torch.distributed is up (or with world size 1: no groups at all)
    ...
    destroy()

Rank order is megatron-core's pipeline-last "tp-cp-ep-dp-pp" (tp innermost, so tensor-parallel peers
share a node; pp outermost, which megatron needs to build expert groups under pp for any ep). The ranks
of one data-parallel replica are then not consecutive when pp > 1: the data loader is given
dp_rank() explicitly (data.dataset places each rank at its replica). Sizes are checked by pretrain.config.validate before any group is created, so a
bad size fails with a message that names the key and the value.
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from pretrain.config import Config, ConfigError, Derived, validate

ORDER = "tp-cp-ep-dp-pp"
_config: Config | None = None


def config() -> Config:
    """The config the groups were created from (its parallel section drives the parallel layers)."""
    if _config is None:
        raise RuntimeError("parallel.state.initialize has not been called")
    return _config


def is_initialized() -> bool:
    """Whether megatron-core's groups exist (never imports megatron-core when it was not imported)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    return bool(ps is not None and ps.model_parallel_is_initialized())


def check_sizes(cfg: Config, world_size: int) -> Derived:
    """validate() with the actual world size; raises ConfigError naming the offending values."""
    return validate(cfg, world_size)


def initialize(cfg: Config, derived: Derived | None = None) -> Derived:
    """Create the tp/pp/ep/cp/dp groups of `cfg.parallel` over the default process group and seed
    the RNG tracker (tensor-parallel ranks get distinct streams, data-parallel replicas equal ones)."""
    if not dist.is_initialized():
        raise RuntimeError("parallel.state.initialize needs torch.distributed to be initialized first")
    world_size = dist.get_world_size()
    checked = check_sizes(cfg, world_size)
    if derived is not None and derived.world_size != world_size:
        raise ConfigError(f"world size {world_size} differs from the one validated ({derived.world_size})")
    from parallel import cpu_compat

    cpu_compat.install()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    p = cfg.parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.virtual_pp, context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep, order=ORDER,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
    global _config
    _config = cfg
    return derived or checked


def tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def tp_size() -> int:
    if not _groups_ready():
        return 1
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    if not _groups_ready():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def dp_size() -> int:
    if not _groups_ready():
        return dist.get_world_size() if dist.is_initialized() else 1
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def dp_rank() -> int:
    if not _groups_ready():
        return dist.get_rank() if dist.is_initialized() else 0
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def cp_size() -> int:
    """Context-parallel size (1 without groups)."""
    if not _groups_ready():
        return 1
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size()


def cp_rank() -> int:
    if not _groups_ready():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_rank()


def cp_group():
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group()


def pp_size() -> int:
    """Pipeline-parallel size (1 without groups)."""
    if not _groups_ready():
        return 1
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def pp_rank() -> int:
    if not _groups_ready():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank()


def pp_group():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def dp_cp_rank() -> int:
    """Rank among the replicas of a parameter: dp x cp (parameters are replicated over both; megatron
    DDP and the distributed optimizer reduce and shard over this group)."""
    if not _groups_ready():
        return dist.get_rank() if dist.is_initialized() else 0
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(with_context_parallel=True)


def ep_size() -> int:
    if not _groups_ready():
        return 1
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size()


def ep_rank() -> int:
    if not _groups_ready():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_rank()


def expert_dp_rank() -> int:
    """Rank in the expert-data-parallel group (the replicas of this rank's experts)."""
    if not _groups_ready():
        return dp_rank()
    from megatron.core import parallel_state as ps

    return ps.get_expert_data_parallel_rank()


def _groups_ready() -> bool:
    return is_initialized()


def destroy(barrier: bool = True) -> None:
    """Tear down megatron's groups (the default process group is left to pretrain.distributed).
    barrier=False after an error on this rank: the other ranks may never reach a barrier."""
    if is_initialized():
        from megatron.core import parallel_state as ps

        if barrier and dist.is_initialized():
            dist.barrier()
        ps.destroy_model_parallel()
    global _config
    _config = None
