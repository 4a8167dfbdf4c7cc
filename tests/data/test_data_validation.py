"""Periodic evaluation (pretrain/evaluate.py) on data.validation: the logged eval loss equals an independent
computation of the model's mean token cross-entropy over the same validation samples, it is written to
metrics.jsonl and TensorBoard at every eval_interval, and evaluating does not change training."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.prepare import prepare
from pretrain.config import load_config, validate
from pretrain.distributed import DistInfo

SEQ_LEN, MB, EVAL_STEPS, EOS = 32, 4, 3, 256
TINY = ["model.d_model=32", "model.vocab_size=264", "model.pattern=M*-E", "model.mamba.num_heads=4",
        "model.mamba.head_dim=8", "model.mamba.d_state=8", "model.mamba.chunk_size=8",
        "model.attention.num_heads=4", "model.attention.num_kv_heads=2", "model.mlp.d_ff=48",
        "model.moe.num_experts=4", "model.moe.d_ff=24", "model.moe.bias_update_rate=0.01"]


def _corpus(path, offset):
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + "abc xyz " * (i % 7)}) + "\n"
                            for i in range(offset, offset + 200)))
    return path


@pytest.fixture
def data(tmp_path):
    train = prepare([_corpus(tmp_path / "train.jsonl", 0)], "bytes", tmp_path / "train", SEQ_LEN, progress=False)
    # exactly EVAL_STEPS micro-batches: one evaluation covers every validation sample once
    prepare([_corpus(tmp_path / "val.jsonl", 10_000)], "bytes", tmp_path / "val", SEQ_LEN, progress=False,
            max_tokens=EVAL_STEPS * MB * (SEQ_LEN + 1))
    assert train["num_samples"] > 4 * MB
    return tmp_path


def _run(root, name, *extra, streams=False):
    from pretrain.trainer import Trainer

    extra_yaml = root / f"{name}.yaml"  # the training data as data.path, or as the one stream of data.streams
    extra_yaml.write_text(f"data:\n  path: ''\n  streams: [{{path: {root / 'train'}}}]\n" if streams
                          else f"data:\n  path: {root / 'train'}\n")
    cfg = load_config(["configs/demo.yaml", str(extra_yaml)], [
        *TINY, "data.demo_corpus=false", f"data.seq_len={SEQ_LEN}",
        f"data.micro_batch_size={MB}", f"data.global_batch_size={MB}", "trainer.max_steps=4",
        "trainer.log_interval=1", "trainer.device=cpu", "kernels.backend=torch", "checkpoint.interval=0",
        "checkpoint.async_save=false", f"run.dir={root / 'runs'}", f"run.name={name}", *extra])
    trainer = Trainer(cfg, validate(cfg), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert trainer.fit() == 0
    records = [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, records


def _independent_loss(model, val_dir) -> float:
    """Mean token cross-entropy over all validation samples, read straight from the shards; seq_idx from
    the EOS positions (a new document right after each EOS)."""
    from streaming import StreamingDataset

    from data.registration_lock import streaming_registration_lock

    with streaming_registration_lock():  # other test workers build datasets at the same time
        ds = StreamingDataset(local=str(val_dir), shuffle=False)
    samples = torch.from_numpy(np.stack([ds[i]["tokens"].astype(np.int64) for i in range(ds.num_samples)]))
    tokens, labels = samples[:, :-1], samples[:, 1:]
    seq_idx = torch.cat([torch.zeros(len(tokens), 1, dtype=torch.int64),
                         torch.cumsum(tokens[:, :-1] == EOS, dim=1)], dim=1).int()
    model.eval()
    with torch.no_grad():
        logits = model(tokens, seq_idx)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).item()


def test_eval_loss_matches_independent_computation(data):
    trainer, records = _run(data, "eval", f"data.validation.path={data / 'val'}", "trainer.eval_interval=2",
                            f"trainer.eval_steps={EVAL_STEPS + 5}")  # more steps than data: one pass only
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    last = evals[-1]
    assert last["eval/tokens"] == EVAL_STEPS * MB * SEQ_LEN
    assert last["eval/perplexity"] == pytest.approx(math.exp(last["eval/loss"]), rel=1e-12)
    # float32 model, same samples in other batch groupings: agreement to ~1e-7 relative; 1e-5 leaves margin
    assert last["eval/loss"] == pytest.approx(_independent_loss(trainer.model, data / "val"), rel=1e-5)
    assert evals[0]["eval/loss"] != last["eval/loss"]  # the model trained in between

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(data / "runs" / "eval" / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval/loss")] == [2, 4]
    assert tb.Scalars("eval/loss")[-1].value == pytest.approx(last["eval/loss"], rel=1e-6)

    # evaluating changed nothing in training (MoE load counters restored, no shared RNG or loader use);
    # this run reads its training data through data.streams (one stream), which is the same as data.path
    _, plain = _run(data, "plain", streams=True)
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]  # noqa: E731
    assert losses(records) == losses(plain)
