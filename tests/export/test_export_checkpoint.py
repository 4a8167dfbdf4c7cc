"""Export from a real training checkpoint: the demo-sized nemotron_h_like model trained 3 steps with
tp=2 (torchrun, 2 CPU ranks, gloo), saved by pretrain.checkpoint (megatron dist_checkpointing), then
exported offline in this single process.

Checks: the exported tensors equal the checkpoint's as read independently by torch DCP
(dcp_to_torch_save; packed Mamba tensors from their z/x/B/C/dt parts); and, in the transformers 5
side environment, the export loads natively and its logits match our single-process model on those
weights (relative error < 1e-4), and it generates.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import DEMO_SIZE, PRESET, REPO, relative_error
from safetensors.torch import load_file
from side_env import ensure_side_env, side_env

from pretrain.config import validate
from pretrain.export import export, load_model_checkpoint, read_safetensors
from pretrain.export_checkpoint import PART_ORDER
from pretrain.export_nemotron_h import from_hf_tensors
from pretrain.model import HybridLM

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
TP = 2


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    words = ["mamba", "state", "space", "token", "expert", "router", "attention", "layer", "norm", "scan"]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))}) + "\n")
    return root


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    from data.prepare import prepare

    tmp = tmp_path_factory.mktemp("tp2run")
    data = tmp / "data"
    prepare([str(_corpus(tmp / "corpus"))], "bytes", data, 32, progress=False)
    overrides = [o for o in DEMO_SIZE if not o.startswith(("data.path", "data.seq_len"))] + [
        f"data.path={data}", "data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=4",
        "trainer.max_steps=3", "trainer.max_tokens=0", "trainer.device=cpu", "optim.warmup_steps=1",
        "checkpoint.async_save=false", f"run.dir={tmp / 'runs'}", "run.name=tp2", f"parallel.tp={TP}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(TMPDIR=str(tmp), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TP),
           "-m", "pretrain.train", "--config", PRESET, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "runs" / "tp2"


def test_export_from_tp2_training_checkpoint(tmp_path, tp2_run):
    out = tmp_path / "hf"
    export(tp2_run / "checkpoints" / "latest", out, dtype="fp32", quiet=True)  # the command
    cfg, state, step = load_model_checkpoint(tp2_run)
    assert step.name == "step_00000003" and cfg.parallel.tp == TP

    # the export holds exactly the checkpoint's tensors, read here without megatron
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    exported, _, _ = from_hf_tensors(read_safetensors(out, progress=False), cfg.model)
    assert exported.keys() == state.keys()
    for name, tensor in exported.items():
        parts = [name] if name in full else [f"{name}.{p}" for p in PART_ORDER if f"{name}.{p}" in full]
        assert len(parts) > (1 if name.endswith(("in_proj.weight", "conv_weight", "conv_bias")) else 0), name
        assert torch.equal(tensor, torch.cat([full[k] for k in parts], dim=0)), name
    assert any(t.abs().max() > 0 for n, t in exported.items() if n.endswith("expert_bias"))  # bias updates ran

    # transformers 5 loads it and computes our logits
    path, info = ensure_side_env()
    if path is None:
        pytest.skip(f"no transformers 5 side environment: {info}")
    tokens = [list(b"def scan(state, token):\n    return norm(state)"[:40]), list(range(60, 100))]
    spec = {"cases": [{"dir": str(out), "tokens": tokens, "prompt_len": 10, "new_tokens": 6, "text": "héllo",
                       "out": str(tmp_path / "logits.safetensors")}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "hf_check.py"), str(tmp_path / "spec.json")],
                          env=side_env(path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])
    assert res["missing"] == [] and res["unexpected"] == [] and len(res["generated"]) == 6
    single = cfg
    single.parallel.tp, single.data.global_batch_size = 1, single.data.micro_batch_size
    model = HybridLM(single.model, validate(single, world_size=1), parallel=False).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        mine = model(torch.tensor(tokens))
        seq = torch.tensor(tokens[:1])[:, :10]
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    err = relative_error(load_file(str(tmp_path / "logits.safetensors"))["logits"], mine)
    print(f"tp=2 checkpoint -> export: relative logit error {err:.2e} (transformers {res['transformers']})")
    assert err < 1e-4
    assert res["generated"] == seq[0, 10:].tolist()
