"""The parallel build (megatron layers; tp = 1 on one gloo rank, Mamba, attention, MLP and a
megatron-routed MoE with its aux loss) keeps no autograd graph after a forward whose loss is dropped
without backward: the single-process build's MoE layers once did (tests/pretrain/test_model.py)."""
from __future__ import annotations

import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import workers  # noqa: E402
from saved_tensor_count import SavedTensorCount  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402


def one_rank(rank: int, world: int) -> dict:
    from parallel import state
    from pretrain.config import load_config, validate

    cfg = load_config([], workers.BASE + ["model.moe.router=softmax_aux"])
    derived = validate(cfg, world)
    state.initialize(cfg, derived)
    eng = workers._engine(cfg, derived, torch.device("cpu"), None, parallel=True, distributed_optimizer=False)
    batch = workers.make_batch(0, cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    out = {}
    for entry in ("loss", "forward"):
        count = SavedTensorCount()
        with count.hooks():
            if entry == "loss":
                result = eng.model.loss(batch["tokens"], batch["labels"], batch["seq_idx"])
            else:
                result = eng.model(batch["tokens"], batch["seq_idx"])
        out[f"{entry}_saved"] = len(count.alive)
        del result
        gc.collect()
        out[f"{entry}_alive"] = len(count.alive)
    return out


def test_a_dropped_forward_of_the_parallel_build_frees_its_graph():
    result = run_ranks(one_rank, 1)[0]
    for entry in ("loss", "forward"):
        assert result[f"{entry}_saved"] > 0, result  # the graph saved activations
        assert result[f"{entry}_alive"] == 0, result
