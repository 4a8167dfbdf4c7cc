"""A training run on a data.streams mixture resumes from a checkpoint with the mixture's position: the
losses after the resume equal the uninterrupted run's (the loader state travels in the checkpoint)."""
from __future__ import annotations

import json

import torch

from data.prepare import prepare
from pretrain.config import load_config, validate
from pretrain.distributed import DistInfo
from test_data_validation import MB, SEQ_LEN, TINY, _corpus


def _train(tmp_path, name, *extra):
    from pretrain.trainer import Trainer

    mix = tmp_path / "mix.yaml"
    mix.write_text(f"data:\n  path: ''\n  streams:\n    - {{path: {tmp_path / 'a'}, proportion: 1.0}}\n"
                   f"    - {{path: {tmp_path / 'b'}, proportion: 3.0}}\n")
    cfg = load_config(["configs/demo.yaml", str(mix)], [
        *TINY, "data.demo_corpus=false", f"data.seq_len={SEQ_LEN}", f"data.micro_batch_size={MB}",
        f"data.global_batch_size={MB}", "trainer.max_steps=6", "trainer.log_interval=1", "trainer.device=cpu",
        "kernels.backend=torch", "checkpoint.interval=3", "checkpoint.async_save=false",
        f"run.dir={tmp_path / 'runs'}", f"run.name={name}", *extra])
    trainer = Trainer(cfg, validate(cfg), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert trainer.fit() == 0
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_mixture_resume_from_checkpoint(tmp_path):
    prepare([_corpus(tmp_path / "a.jsonl", 0)], "bytes", tmp_path / "a", SEQ_LEN, progress=False)
    prepare([_corpus(tmp_path / "b.jsonl", 5000)], "bytes", tmp_path / "b", SEQ_LEN, progress=False)
    full = _train(tmp_path, "full")
    step3 = tmp_path / "runs" / "full" / "checkpoints" / "step_00000003"
    assert step3.is_dir()
    resumed = _train(tmp_path, "resumed", f"checkpoint.resume={step3}")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bit-identical on CPU
