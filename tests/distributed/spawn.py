"""Spawn a gloo process group for a test: `run_ranks(fn, world_size, *args)` -> per-rank results.

mp.spawn with a file:// rendezvous (no port races). `fn(rank, world_size, *args)` must be a
module-level function; its return value (picklable) is collected per rank. RANK / WORLD_SIZE /
LOCAL_RANK / LOCAL_WORLD_SIZE are set (mosaicml-streaming reads them); each rank uses one thread.
The default process group and megatron's groups are torn down with a barrier first.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    import faulthandler
    import sys

    # a hung collective shows up as every rank's stack on stderr
    faulthandler.dump_traceback_later(float(os.environ.get("HP_TEST_STACK_DUMP_S", "600")), repeat=True, file=sys.stderr)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # report to the parent, then fail the rank
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    if payload[0] == "error":  # the other ranks may wait in a collective: end now, mp.spawn stops them
        sys.stderr.write(payload[1])
        os._exit(1)
    try:
        from parallel import state

        state.destroy()
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(_entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True)
        except Exception as err:
            errors = []
            for rank in range(world_size):
                path = os.path.join(tmp, f"rank{rank}.pkl")
                if os.path.exists(path):
                    status, value = pickle.load(open(path, "rb"))
                    if status == "error":
                        errors.append(f"rank {rank}:\n{value}")
            raise RuntimeError("\n".join(errors) or str(err)) from None
        results = []
        for rank in range(world_size):
            status, value = pickle.load(open(os.path.join(tmp, f"rank{rank}.pkl"), "rb"))
            results.append(value)
        return results
