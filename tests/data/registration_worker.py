"""A process of tests/data/test_data_registration_lock.py (run as a script, one job or one rank each).

python registration_worker.py build MODE DATA_DIR GO_FILE OUT_JSON
    MODE raw: a plain StreamingDataset; MODE loader: data.dataset.build_train_loader. Streaming's prefix probe
    is slowed by PROBE_SLEEP_S so two such processes started together probe before either registers. Writes
    {"prefix": int} or {"error": "Type: message"}.
python registration_worker.py lock RANK WORLD INIT_FILE LOCK_FILE GO_FILE DELAY_S OUT_JSON
    DELAY_S after GO_FILE, enters streaming_registration_lock(LOCK_FILE) (as rank RANK of a gloo job of WORLD
    ranks when WORLD > 1) and holds it 0.2 s. Writes {"acquired": time.time()}.

Each waits for GO_FILE after its imports, so the test starts them together, and a builder keeps its
dataset (its shared memory) until GO_FILE.finish exists, so the other's registration sees it.
"""
import json
import os
import sys
import time
from pathlib import Path

PROBE_SLEEP_S = 1.0


def wait_for(go_file: str) -> None:
    Path(go_file + f".ready.{os.getpid()}").touch()
    while not os.path.exists(go_file):
        time.sleep(0.005)


def build(mode: str, data_dir: str, go_file: str) -> dict:
    from streaming import StreamingDataset
    from streaming.base.shared import prefix

    probe = prefix._check_and_find_retrying

    def slow_probe(*args, **kwargs):
        found = probe(*args, **kwargs)
        time.sleep(PROBE_SLEEP_S)  # the window between streaming's probe and its create, widened
        return found

    prefix._check_and_find_retrying = slow_probe
    from data.dataset import build_train_loader

    wait_for(go_file)
    global dataset  # kept until the process exits
    try:
        if mode == "raw":
            dataset = StreamingDataset(local=data_dir, shuffle=False)
        else:
            dataset = build_train_loader(data_dir, seq_len=16, micro_batch_size=2, seed=1).dataset
    except Exception as e:  # noqa: BLE001 - reported to the test, which judges it
        return {"error": f"{type(e).__name__}: {e}"}
    return {"prefix": dataset._shm_prefix_int}


def lock(rank: str, world: str, init_file: str, lock_file: str, go_file: str, delay_s: str) -> dict:
    import torch.distributed as dist

    from data.registration_lock import streaming_registration_lock

    if int(world) > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=int(world))
    wait_for(go_file)
    time.sleep(float(delay_s))
    with streaming_registration_lock(lock_file):
        acquired = time.time()
        time.sleep(0.2)
    if int(world) > 1:
        dist.destroy_process_group()
    return {"acquired": acquired}


if __name__ == "__main__":
    command, *args, out = sys.argv[1:]
    if command == "build":
        mode, data_dir, go_file = args
        Path(out).write_text(json.dumps(build(mode, data_dir, go_file)))
        while not os.path.exists(go_file + ".finish"):
            time.sleep(0.01)
    else:
        Path(out).write_text(json.dumps(lock(*args)))
