"""Process launch environment: torchrun or Slurm variables -> rank, world size, device, process group.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. One Slurm task per GPU
(`srun python -m pretrain.train ...`) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead:
they are mapped onto torch's variables here, with MASTER_ADDR taken from the first node of the job.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return nodelist.split(",")[0]


def map_slurm_env() -> None:
    """One task per GPU under srun: derive torch's launch variables from Slurm's (torchrun's win)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but CUDA is not available on this machine")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Initialise the default process group when launched with more than one process."""
    map_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=int(os.environ.get("HP_DIST_TIMEOUT_MIN", "30"))))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def init_single_rank_group(device: torch.device) -> None:
    """A process group of this one process (trainer.engine=megatron without a launcher): megatron-core's
    engine needs groups even at world size 1."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def collective_device(group=None) -> torch.device:
    """Where a tensor must live for a collective over `group` (None: the default group): the current
    CUDA device for NCCL (which rejects CPU tensors: "No backend type associated with device type
    cpu"), the CPU for gloo."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "cpu:gloo" not in backend:  # "nccl", not a mixed "cpu:gloo,cuda:nccl"
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown_distributed(clean: bool = True) -> None:
    """clean=False (an error on this rank): skip the final barrier, the other ranks may never reach it."""
    from parallel.state import destroy

    destroy(barrier=clean)  # megatron-core's groups, if any
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()  # without it gloo teardown of several ranks aborts now and then
        dist.destroy_process_group()
