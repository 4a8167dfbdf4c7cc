"""Read packed MDS shards (written by data.prepare) as shuffled, rank-aware, resumable training batches.

    loader = build_train_loader("data/mds", seq_len=2048, micro_batch_size=4, seed=1234,
                                dp_rank=dp_rank, dp_size=dp_size)
    batches = infinite_batches(loader)          # runs across epochs; the trainer counts steps
    batch = next(batches)                       # tokens (B, L) int64, labels (B, L) int64, seq_idx (B, L) int32
    state = loader.state_dict()                 # into the checkpoint (a small JSON-able dict)
    loader.load_state_dict(state)               # on a fresh loader, before iterating: resumes the order
    build_train_loader(streams=[{"path": "data/web", "proportion": 0.7},            # a mixture through
                                {"remote": "s3://b/code", "local": "/cache/code", "proportion": 0.3}], ...)
                                                # streaming's own Stream mixing (data.streams)

seq_idx[b, i] is the index of the document that position i belongs to, counted from 0 within each sample;
it increases by one right after every EOS, so SSD scans reset their state and attention masks stop at
document boundaries. labels[b, i] = tokens[b, i + 1] of the packed sample (the label at an EOS is the first
token of the next document, as in Megatron-LM without eod masking).

Ranks: mosaicml-streaming reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment
(torchrun and slurm/train.sbatch set them; a plain `python` run is rank 0 of 1). Pass the data-parallel
coordinates explicitly: the ranks that share a dp_rank (tensor/context/pipeline parallel peers) get
identical batches. Streaming's own `replication` assumes the ranks of one replica are consecutive
(dp_rank == RANK // replication), which megatron-core's pipeline-last order "tp-cp-ep-dp-pp" breaks when
pp > 1; PackedDataset therefore places this rank at `dp_rank` among the replicas itself (streaming's
partition of samples over replicas is unchanged, only which replica this rank is), so any rank layout
works and the coordination (shared memory, local leaders) stays per physical node.

Shared memory: every StreamingDataset registers /dev/shm/NNNNNN_* blocks (freed at normal exit) and
$TMPDIR/NNNNNN_*_filelock files. A SIGKILLed run leaks both; build_train_loader notes in TMPDIR which
process owns which blocks and first removes those of dead processes (`clean_stale_streaming_shm`), so a
requeued job starts clean. Keep TMPDIR the same across requeues of a job (e.g. /tmp, or one derived from
the job id). Blocks of a prefix whose locals block is gone (a run killed while it freed its blocks, or
leaked by any earlier run) are removed too (`unlink_orphan_streaming_shm`): streaming picks a new
prefix as the highest first-free number over the block kinds, so one such stray block (say
000000_resume) made it choose a prefix whose locals block a live dataset holds: FileExistsError
'/000001_locals' in every later run on the host that builds a second dataset beside a live one.
Two jobs that build their datasets on one host at the same moment could also pick the same prefix;
build_train_loader therefore holds a host-wide lock while it cleans and builds (data.registration_lock).

Call build_train_loader on every rank (streaming runs a barrier on the default process group) and
after torch.distributed is initialised (with WORLD_SIZE > 1 it refuses to run without a process group).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from multiprocessing.shared_memory import _posixshmem  # POSIX shm_unlink, as the stdlib uses
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base import distributed as sdist
from streaming.base.constant import SHM_TO_CLEAN
from streaming.base.world import World

from data.registration_lock import streaming_registration_lock
from data.streams import StreamSpec, check_stream, stream_specs, to_streaming


# ----------------------------------------------------------------------------------------------- checks
def _replication(dp_rank: int | None, dp_size: int | None) -> int | None:
    """Streaming's `replication` for the given dp coordinates (None when every rank is its own replica)."""
    rank, world = sdist.get_rank(), sdist.get_world_size()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if (torch.distributed.get_rank(), torch.distributed.get_world_size()) != (rank, world):
            raise RuntimeError(
                f"RANK/WORLD_SIZE in the environment ({rank}/{world}) differ from torch.distributed "
                f"({torch.distributed.get_rank()}/{torch.distributed.get_world_size()}): set the env vars "
                "(mosaicml-streaming reads them) before building the data loader")
    if dp_size is None and dp_rank is None:
        return None
    if dp_size is None or dp_rank is None:
        raise ValueError("pass both dp_rank and dp_size (or neither: every rank is then its own dp rank)")
    if dp_size < 1 or world % dp_size or not 0 <= dp_rank < dp_size:
        raise ValueError(f"impossible data-parallel coordinates dp_rank={dp_rank}, dp_size={dp_size} "
                         f"for WORLD_SIZE={world}")
    replication = world // dp_size
    return replication if replication > 1 else None


# ----------------------------------------------------------------------------------------------- dataset
def sample_to_example(tokens: np.ndarray, doc_starts: np.ndarray) -> dict[str, torch.Tensor]:
    """One packed sample (seq_len + 1 tokens, document starts) -> tokens, labels, seq_idx of length seq_len."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    seq_len = len(tokens) - 1
    seq_idx = np.searchsorted(doc_starts, np.arange(seq_len), side="right") - 1
    return {"tokens": ids[:-1], "labels": ids[1:], "seq_idx": torch.from_numpy(seq_idx.astype(np.int32))}


class PackedDataset(StreamingDataset):
    """StreamingDataset over data.prepare output (one or several streams) whose items are
    {tokens, labels, seq_idx} tensors. With `replication`, `dp_rank` says which replica this rank
    belongs to (any rank layout; see the module docstring)."""

    def __init__(self, specs: list[StreamSpec], *, seq_len: int, dp_rank: int | None = None, **kwargs: Any):
        self.seq_len = seq_len
        super().__init__(streams=to_streaming(specs), **kwargs)
        if kwargs.get("replication") is not None:
            self._place_replica(dp_rank)

    def _place_replica(self, dp_rank: int) -> None:
        """Streaming (0.13) keeps "who we are for iterating" in `_parallel_rank_world`, built as
        world.replicate(replication), i.e. replica RANK // replication; keep its sizes and put this
        rank at replica `dp_rank` instead."""
        replicated = getattr(self, "_parallel_rank_world", None)
        if not isinstance(replicated, World):
            raise RuntimeError("mosaicml-streaming no longer has StreamingDataset._parallel_rank_world: "
                               "data.dataset.PackedDataset._place_replica must follow its new API")
        self._parallel_rank_world = World(
            num_nodes=replicated.num_nodes, ranks_per_node=replicated.ranks_per_node,
            workers_per_rank=replicated.workers_per_rank,
            worker=dp_rank * replicated.workers_per_rank + replicated.worker_of_rank)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        tokens = sample["tokens"]
        if len(tokens) != self.seq_len + 1:
            raise ValueError(f"sample {idx} has {len(tokens)} tokens, expected seq_len + 1 = {self.seq_len + 1}")
        return sample_to_example(tokens, sample["doc_starts"])


def build_train_loader(
    path: str | os.PathLike | None = None,
    *,
    streams: list[dict] | None = None,
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    dp_rank: int | None = None,
    dp_size: int | None = None,
    vocab_size: int | None = None,
    num_canonical_nodes: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    clean_stale_shm: bool = True,
) -> StreamingDataLoader:
    """A StreamingDataLoader of `micro_batch_size` samples per rank (full batches only).

    Reads `path` (one local prepared directory) or `streams`, a mixture as described in data.streams
    (dicts with path or remote + local, and proportion or repeat/choose).

    dp_rank/dp_size: this rank's data-parallel coordinates (default: RANK/WORLD_SIZE, pure data
    parallelism); see the module docstring. vocab_size: the model's, checked against the data's.
    The loader has state_dict()/load_state_dict() (call load_state_dict before iterating).
    clean_stale_shm: first unlink streaming shared memory left by killed runs (see module docstring).
    """
    specs = stream_specs(path, streams)
    for spec in specs:
        check_stream(spec, seq_len, vocab_size)
    replication = _replication(dp_rank, dp_size)
    with streaming_registration_lock():  # no other job on this host picks a prefix meanwhile
        if clean_stale_shm:
            clean_stale_streaming_shm()
        dataset = PackedDataset(
            specs, seq_len=seq_len, batch_size=micro_batch_size, shuffle=shuffle, shuffle_seed=seed,
            replication=replication, num_canonical_nodes=num_canonical_nodes, dp_rank=dp_rank,
        )
        _record_owner(dataset)
    return StreamingDataLoader(
        dataset, batch_size=micro_batch_size, num_workers=num_workers, drop_last=True,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def infinite_batches(loader: StreamingDataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches forever: each pass over `loader` is the next epoch (StreamingDataset counts epochs).

    The loader's state_dict() stays valid while this generator runs, also across epoch boundaries.
    """
    empty_passes = 0
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        empty_passes = 0 if yielded else empty_passes + 1
        if empty_passes >= 2:  # one empty pass is normal: a resume exactly at the end of an epoch
            raise RuntimeError(
                f"the data loader yields no batches: the dataset has fewer samples per rank than "
                f"micro_batch_size={loader.batch_size}")


# ----------------------------------------------------------------------------------------------- cleanup
_SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"^(\d{6})_(" + "|".join(SHM_TO_CLEAN) + r")$")
_OWNER = "hp_streaming_shm_{prefix}_{pid}.json"  # in TMPDIR: which process registered which shm prefix


def _record_owner(dataset: StreamingDataset) -> None:
    """Note in TMPDIR that this process uses the dataset's shm prefix (its locals block, by inode)."""
    prefix = f"{getattr(dataset, '_shm_prefix_int', -1):06}"
    try:
        inode = os.stat(_SHM_DIR / f"{prefix}_locals").st_ino
        record = {"prefix": prefix, "pid": os.getpid(), "locals_inode": inode}
        (Path(tempfile.gettempdir()) / _OWNER.format(prefix=prefix, pid=os.getpid())).write_text(json.dumps(record))
    except OSError:  # no /dev/shm (not Linux) or an unexpected streaming layout: nothing to record
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mapped_shm_blocks() -> set[tuple[str, int]]:
    """(name, inode) of every /dev/shm file mapped by a process we can inspect.

    The inode tells the current file from an unlinked one of the same name that a process still maps."""
    blocks = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:  # address perms offset dev inode /dev/shm/name [(deleted)]
                        fields = line.split()
                        blocks.add((fields[5].rsplit("/", 1)[1], int(fields[4])))
        except (OSError, IndexError, ValueError):  # gone, or another user's (cannot map our 0600 files)
            continue
    return blocks


def unlink_orphan_streaming_shm() -> list[str]:
    """Unlink this user's streaming blocks (/dev/shm/NNNNNN_<kind>) whose prefix has no locals block;
    return their names. A live dataset's locals block exists from before its other blocks are made
    until it frees them, so such a block belongs to no live registration (nobody attaches to it by
    name again; a process that still maps it keeps its mapping)."""
    if not _SHM_DIR.is_dir():
        return []
    names = [n for n in os.listdir(_SHM_DIR) if _SHM_NAME.match(n)]
    with_locals = {n[:6] for n in names if n.endswith("_locals")}
    removed = []
    for name in names:
        # checked again just before the unlink: a listing can miss a locals block made during it
        if name[:6] in with_locals or (_SHM_DIR / f"{name[:6]}_locals").exists():
            continue
        try:
            if os.stat(_SHM_DIR / name).st_uid != os.getuid():
                continue  # another user's: not ours to judge
            _posixshmem.shm_unlink("/" + name)
            removed.append(name)
        except OSError:  # gone meanwhile (another rank cleaning), or not permitted
            continue
    return removed


def clean_stale_streaming_shm(tmpdir: str | os.PathLike | None = None) -> list[str]:
    """Unlink streaming shared memory of dead processes that used `tmpdir`; return the prefixes cleaned.

    A SIGKILLed run leaks its /dev/shm/NNNNNN_* blocks (streaming frees them only at a normal exit) and
    $TMPDIR/NNNNNN_*_filelock files. build_train_loader records in TMPDIR (default tempfile.gettempdir())
    which process registered which prefix, identified by the inode of its locals block. A prefix is
    cleaned only when its recording process is dead, its locals block is still that same file (streaming
    never hands out a prefix whose locals block exists, so the other blocks are that run's too) and no
    process maps any of its blocks (checked in /proc). So live runs, also of other jobs and other TMPDIRs,
    are never touched, unlike streaming's clean_stale_shared_memory(). Does nothing without /proc.
    Called by build_train_loader; safe from several ranks at once. Orphan blocks (no locals block)
    are unlinked first (unlink_orphan_streaming_shm).
    """
    unlink_orphan_streaming_shm()
    tmpdir = Path(tmpdir or tempfile.gettempdir())
    if not Path("/proc/self/maps").exists() or not _SHM_DIR.is_dir() or not tmpdir.is_dir():
        return []
    records = []
    for path in tmpdir.glob(_OWNER.format(prefix="*", pid="*")):
        try:
            records.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    live_prefixes = {rec["prefix"] for _, rec in records if _pid_alive(rec["pid"])}
    dead = [(path, rec) for path, rec in records if rec["prefix"] not in live_prefixes]
    if not dead:
        return []
    mapped, shm_names, cleaned = _mapped_shm_blocks(), os.listdir(_SHM_DIR), []
    for path, rec in dead:
        prefix = rec["prefix"]
        names = [n for n in shm_names if (m := _SHM_NAME.match(n)) and m.group(1) == prefix]
        stats = {}
        for name in names:
            try:
                stats[name] = os.stat(_SHM_DIR / name)
            except FileNotFoundError:  # unlinked meanwhile (another rank cleaning)
                pass
        same_run = prefix + "_locals" in stats and stats[prefix + "_locals"].st_ino == rec["locals_inode"]
        if same_run:
            if any((n, st.st_ino) in mapped for n, st in stats.items()):
                continue  # still mapped by someone: not stale after all
            for name in names:
                try:
                    _posixshmem.shm_unlink("/" + name)
                except OSError:
                    pass
            if prefix not in cleaned:
                cleaned.append(prefix)
        elif prefix + "_locals" in stats:
            path.unlink(missing_ok=True)  # the prefix now serves another run (other TMPDIR): keep its files
            continue
        for name in (path.name, f"{prefix}_barrier_filelock", f"{prefix}_cache_filelock"):
            (tmpdir / name).unlink(missing_ok=True)
    return sorted(cleaned)
