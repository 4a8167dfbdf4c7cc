"""A host-wide lock around mosaicml-streaming's shared-memory registration, so that jobs which build their
datasets on one machine at the same moment cannot pick the same shared-memory prefix.

    with streaming_registration_lock():         # on every rank, like the dataset construction itself
        dataset = StreamingDataset(...)

Why: a StreamingDataset (0.13) chooses its prefix NNNNNN by probing /dev/shm for the first free number,
then its node's local leader creates /dev/shm/NNNNNN_locals. Two processes of different jobs that probe
before either creates get the same number, and the later one fails with FileExistsError
'/0000NN_locals' (CI saw it with two pytest workers; two Slurm jobs sharing a node can do the same).
Every rank of the job probes, so the whole construction must be inside the lock, not just the leader's
create.

How: on each host one rank (the lowest of those that open the same lock file there) takes an exclusive
flock on one file per host (`LOCK_PATH`; the kernel drops it when the process dies, so a killed run never
leaves it held); the host's other ranks wait for it. With torch.distributed initialised, the takers only
try the lock and all ranks agree (all_gather_object) that every host's taker holds its lock; if one does
not, the takers that got theirs let go and all try again after a random pause. So two multi-node jobs over
the same nodes can never deadlock each holding one node's lock. The takers release after a final barrier,
once every rank has built its dataset (not after a failure: the job is going down, and a barrier could
hang). With WORLD_SIZE > 1 in the environment and no process group it refuses to start: every rank
would take the lock on its own and then wait for the others inside streaming's barrier.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

# /dev/shm is the namespace that the race is over: one file there is seen by every job on the host,
# whatever their TMPDIR.
LOCK_PATH = (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")) / "hp_streaming_registration.lock"
WAIT_NOTICE_S = 60.0  # say on stderr which file we wait for after this long
PAUSE_S = (0.02, 0.3)  # the range of the random pause between tries


def _open_lock_file(path: Path) -> int:
    """A read-only fd on the lock file (created if missing): flock needs no write access, so jobs of
    other users, which share the shared-memory namespace, can take the same file."""
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_taker(fd: int, distributed: bool) -> bool:
    """Whether this rank takes the lock: the lowest rank among those that opened the same file (host,
    device, inode: ranks of simulated nodes with private /dev/shm mounts have different files)."""
    if not distributed:
        return True
    stat = os.fstat(fd)
    here = (socket.gethostname(), stat.st_dev, stat.st_ino)
    places: list[tuple[str, int, int] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(places, here)
    return places.index(here) == torch.distributed.get_rank()


def _all_hold(held: bool) -> bool:
    """Whether every rank of the default process group reports True (the non-takers report True)."""
    flags: list[bool | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, held)
    return all(flags)


@contextmanager
def streaming_registration_lock(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold the host's registration lock (`path`, default LOCK_PATH) while the body builds streaming
    datasets. Enter it on every rank of the default process group (it runs collectives there when
    torch.distributed is initialised)."""
    path = Path(path or LOCK_PATH)
    distributed = _distributed()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # what streaming will read
    if world > 1 and not distributed:  # each rank would take the lock alone, then wait for the others
        raise RuntimeError(
            f"WORLD_SIZE={world} in the environment but torch.distributed is not initialised: build the data "
            "loader after init_process_group (every rank enters its host-wide registration lock together)")
    fd = _open_lock_file(path)
    try:
        if not _is_taker(fd, distributed):
            os.close(fd)
            fd = None
        start, noticed = time.monotonic(), False
        while True:
            held = _try_lock(fd) if fd is not None else True
            if (_all_hold(held) if distributed else held):
                break
            if held and fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if not held and not noticed and time.monotonic() - start > WAIT_NOTICE_S:
                noticed = True
                print(f"[data] still waiting for {path}: another job on this host is building its streaming "
                      f"datasets (their shared-memory registration is serialised per host)", file=sys.stderr)
            time.sleep(random.uniform(*PAUSE_S))
        yield
        if distributed:
            torch.distributed.barrier()  # every rank has registered before the next job may probe
    finally:
        if fd is not None:
            os.close(fd)  # closing the only fd on it releases the flock
