"""One rank of a gloo run for test_data_dataset: reads an epoch as pure dp, as one dp replica and, at
world size 4, in megatron's pipeline-last layout with pp=2 x dp=2 (replicas {0, 2} and {1, 3}).

python rank_worker.py RANK WORLD_SIZE INIT_FILE DATA_DIR SEQ_LEN OUT_JSON
"""
import json
import os
import sys

import torch.distributed as dist

from data.dataset import build_train_loader

if __name__ == "__main__":
    rank, world, init_file, path, seq_len, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    layouts = {"dp": {}, "replicated": {"dp_rank": 0, "dp_size": 1}}
    if world == 4:
        layouts["pp_last"] = {"dp_rank": rank % 2, "dp_size": 2}
    for name, dp in layouts.items():
        loader = build_train_loader(path, seq_len=int(seq_len), micro_batch_size=4, seed=7, **dp)
        result[name] = [row.tolist() for batch in loader for row in batch["tokens"]]
    with open(out, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
