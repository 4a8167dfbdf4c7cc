"""The parallel build's loss at tp = cp = 1 (data parallelism only; the megatron engine on one GPU)
runs the chunked head + cross-entropy of the single-process build (ParallelHybridLM.loss): on one
gloo rank, the chunked loss (no vocab-parallel logits computed) and every gradient equal megatron's
vocab-parallel cross-entropy over the full logits, with and without the z-loss and with ignored
labels (float32: summation order only, 1e-5 relative); and two dp ranks with chunking follow the
single-process model (tests/parallel/test_parallel.py's dp2 check, with a chunk size)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import workers  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402


def _loss_and_grads(eng, batch, z_loss):
    eng.zero_grad()
    model = eng.model
    with eng.ddp.no_sync():  # gradients into the main-grad buffers, no reduction (one rank)
        loss, ce = model.loss(batch["tokens"], batch["labels"], batch["seq_idx"], z_loss)
        loss.backward()
    grads = {n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).clone()
             for n, p in model.named_parameters()}
    return float(loss), float(ce), grads


def one_rank(rank: int, world: int) -> dict:
    from parallel import state
    from parallel.model import ParallelHybridLM
    from pretrain.config import load_config, validate

    cfg = load_config([], workers.BASE + ["trainer.loss_chunk_tokens=10"])
    derived = validate(cfg, world)
    state.initialize(cfg, derived)
    eng = workers._engine(cfg, derived, torch.device("cpu"), None, parallel=True, distributed_optimizer=False)
    calls = []
    logits = ParallelHybridLM.vocab_parallel_logits
    ParallelHybridLM.vocab_parallel_logits = lambda self, *a: calls.append(1) or logits(self, *a)
    batch = workers.make_batch(0, cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    batch["labels"] = batch["labels"].clone()  # a view of the tokens
    batch["labels"][0, :5] = -100  # ignored positions
    out = {}
    for z_loss in (0.0, 1e-3):
        chunked = _loss_and_grads(eng, batch, z_loss)
        out[f"chunked_calls_{z_loss}"] = len(calls)
        eng.model.loss_chunk_tokens = 0
        full = _loss_and_grads(eng, batch, z_loss)
        eng.model.loss_chunk_tokens = 10
        out[f"full_calls_{z_loss}"] = len(calls)
        out[f"loss_err_{z_loss}"] = abs(chunked[0] - full[0]) / abs(full[0])
        out[f"ce_err_{z_loss}"] = abs(chunked[1] - full[1]) / abs(full[1])
        out[f"grad_err_{z_loss}"] = max(workers._rel(chunked[2][n], full[2][n]) for n in full[2]
                                        if full[2][n].norm() > 0)
        calls.clear()
    return out


@pytest.fixture(scope="module")
def result():
    return run_ranks(one_rank, 1)[0]


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_parallel_loss_equals_the_vocab_parallel_one(result, z_loss):
    assert result[f"chunked_calls_{z_loss}"] == 0  # no (tokens, vocab) logits on the chunked path
    assert result[f"full_calls_{z_loss}"] == 1
    assert result[f"loss_err_{z_loss}"] < 1e-5
    assert result[f"ce_err_{z_loss}"] < 1e-5
    assert result[f"grad_err_{z_loss}"] < 1e-5
