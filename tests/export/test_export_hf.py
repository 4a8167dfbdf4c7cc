"""The real check: transformers 5 loads our export natively and computes our logits.

A demo-sized nemotron_h_like model (M, *, -, E; relu2; sigmoid router with expert bias and a shared
expert), trained a few steps, is exported; a subprocess in the transformers 5 side environment
(side_env.py; skipped with the reason when it cannot be installed) loads it with
AutoModelForCausalLM.from_pretrained (no remote code), computes float32 logits, generates greedily
and tokenizes text. We compare: relative error of the logits < 1e-4, the same greedy tokens as our
model, byte ids from the exported byte tokenizer. A variant covers the other mapping branches (tied
head, no shared expert, top-1 routing, dt floor, projection and MLP biases) and a bf16 export.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import VARIANT, relative_error, trained_checkpoint
from safetensors.torch import load_file
from side_env import ensure_side_env, side_env

from pretrain.config import from_yaml_text, validate
from pretrain.export import export, import_export
from pretrain.model import HybridLM

HERE = Path(__file__).resolve().parent
TEXT = "def main():\n    print('héllo, wörld')  # ünïcödé 🤗\n    return 0\n"
PROMPT_LEN, NEW_TOKENS = 12, 8
MAX_REL_ERR = 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def side_env_path():
    path, info = ensure_side_env()
    if path is None:
        pytest.skip(f"no transformers 5 side environment: {info}")
    return path


def greedy(model: HybridLM, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, prompt.shape[1]:].tolist()


def load_ours(directory: Path) -> HybridLM:
    cfg = from_yaml_text((directory / "config.yaml").read_text())
    cfg.data.path = "unused"
    model = HybridLM(cfg.model, validate(cfg))
    model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
    return model.eval()


def test_transformers5_loads_export_and_matches_logits(tmp_path, side_env_path):
    data = list(TEXT.encode("utf-8"))
    tokens = [data[:40], data[-40:]]  # 40 > chunk_size 16, not a multiple of it
    cases, ours = [], {}
    for name, variant, dtype in (("main", [], "fp32"), ("variant", VARIANT, "fp32"), ("main_bf16", [], "bf16")):
        ckpt = tmp_path / f"ckpt_{name.split('_')[0]}"
        if not ckpt.exists():
            trained_checkpoint(ckpt, *variant)
        out = tmp_path / f"hf_{name}"
        export(ckpt, out, dtype=dtype, max_shard_size="200KB", quiet=True)
        # our model with exactly the exported weights (bf16-rounded for the bf16 export)
        import_export(out, tmp_path / f"ours_{name}", quiet=True)
        ours[name] = load_ours(tmp_path / f"ours_{name}")
        cases.append({"dir": str(out), "tokens": tokens, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                      "text": TEXT, "out": str(tmp_path / f"logits_{name}.safetensors"), "name": name})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    proc = subprocess.run([sys.executable, str(HERE / "hf_check.py"), str(spec)], env=side_env(side_env_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), proc.stdout

    batch = torch.tensor(tokens)
    for case, res in zip(cases, results):
        name = case["name"]
        assert res["class"] == "NemotronHForCausalLM" and int(res["transformers"].split(".")[0]) >= 5
        assert res["missing"] == [] and res["unexpected"] == [] and res["mismatched"] == [], res
        theirs = load_file(case["out"])["logits"]
        with torch.no_grad():
            mine = ours[name](batch)
        err = relative_error(theirs, mine)
        print(f"{name}: relative logit error {err:.2e}, max abs {float((theirs - mine).abs().max()):.2e}, "
              f"transformers {res['transformers']} load+run {res['seconds']}s")
        assert err < MAX_REL_ERR, (name, err)
        assert len(res["generated"]) == NEW_TOKENS
        if name != "variant":  # transformers' decode step skips the dt clamp (time_step_min): see the mapping
            assert res["generated"] == greedy(ours[name], batch[:1, :PROMPT_LEN], NEW_TOKENS), name
        assert res["text_ids"] == data and res["decoded"] == TEXT and res["eos_token_id"] == 256
