"""One rank of a gloo run for test_data_mixture: reads with dp=WORLD_SIZE and reports what it saw.

python resume_worker.py RANK WORLD_SIZE INIT_FILE JOB_JSON OUT_JSON

JOB_JSON: {"loader": build_train_loader kwargs (path or streams, seq_len, micro_batch_size, seed),
           "first_batches": k, "resume_state": state or null}
OUT_JSON (per rank): {"epoch": samples of one uninterrupted epoch, "first": samples of the first k
batches, "state": the loader state after them, "resumed": the samples from resume_state to the epoch end}.
A sample is its list of tokens followed by the last label (seq_len + 1 tokens).
"""
import json
import os
import sys

import torch.distributed as dist

from data.dataset import build_train_loader


def samples(batches):
    return [t.tolist() + [l[-1].item()] for b in batches for t, l in zip(b["tokens"], b["labels"])]


if __name__ == "__main__":
    rank, world, init_file, job, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    job = json.loads(open(job).read())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {"epoch": samples(build_train_loader(**job["loader"]))}
    loader = build_train_loader(**job["loader"])
    it = iter(loader)
    result["first"] = samples(next(it) for _ in range(job["first_batches"]))
    result["state"] = loader.state_dict()
    del it
    if job.get("resume_state"):
        loader = build_train_loader(**job["loader"])
        loader.load_state_dict(job["resume_state"])
        result["resumed"] = samples(loader)
    with open(out, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
