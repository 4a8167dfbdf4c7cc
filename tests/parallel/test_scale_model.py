"""bench/scale_model.py, the memory and time model on paper: its parameter counts against the real
models (the meta-built single-process model; the parallel build's ranks on 2 gloo ranks), and the
direction of its memory terms. Its bandwidth and MFU constants are assumptions, not tested here."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import scale_model  # noqa: E402
import scale_workers  # noqa: E402
from pretrain.config import load_config, validate  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402
from workers import BASE  # noqa: E402

LAYOUTS = [["parallel.tp=2"], ["parallel.ep=2", "data.global_batch_size=4"], ["parallel.pp=2"],
           ["parallel.pp=2", "model.tie_embeddings=true"]]  # the last stage's own copy of the tied head


def _plan(config, overrides, world):
    cfg = load_config([config] if config else [], (["data.path=unused"] if config else []) + overrides)
    derived = validate(cfg, world)
    return scale_model.plan(cfg, derived, *scale_model.layer_parameters(cfg, derived))


def test_layer_parameters_add_up_to_the_model_and_its_experts():
    from pretrain.model import HybridLM
    import torch

    cfg = load_config(["configs/jamba_like.yaml"], ["data.path=unused"])
    derived = validate(cfg)
    per_layer, embed, head = scale_model.layer_parameters(cfg, derived)
    with torch.device("meta"):
        counts = HybridLM(cfg.model, derived, parallel=False).num_parameters()
    assert sum(d + e for d, e in per_layer) + embed + head == counts["total"]
    e, k = cfg.model.moe.num_experts, cfg.model.moe.top_k  # inactive = (E - k) / E of the routed experts
    assert sum(x for _, x in per_layer) * (e - k) == (counts["total"] - counts["active"]) * e


def test_parameters_per_rank_match_the_parallel_build():
    """ep and pp exactly (pp: the larger of the first and last stage); tp within 2%: the model splits
    every dense parameter over tp, the build replicates the norms and the router (1.2% of this tiny
    model, ~1e-4 of Jamba-v0.1)."""
    real = run_ranks(scale_workers.elements_per_layout, 2, LAYOUTS)
    for i, overrides in enumerate(LAYOUTS):
        modelled = _plan(None, BASE + overrides, 2).params_rank
        held = max(rank[i] for rank in real)
        if "parallel.tp=2" in overrides:
            assert abs(modelled - held) <= 0.02 * held, (overrides, modelled, held)
        else:
            assert modelled == held, (overrides, modelled, held)


def test_memory_terms_move_the_right_way():
    base = ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4"]
    p = _plan("configs/jamba_v01.yaml", base, 64)
    wider_tp = _plan("configs/jamba_v01.yaml", ["parallel.tp=4", "parallel.sequence_parallel=true", "parallel.ep=4"], 64)
    full = _plan("configs/jamba_v01.yaml", base + ["trainer.recompute=full"], 64)
    assert wider_tp.weights_gb < p.weights_gb and wider_tp.activations_gb < p.activations_gb
    assert full.activations_gb < p.activations_gb / 4 and full.step_s > p.step_s
    assert abs(p.params_rank * 6 / 1e9 - p.weights_gb) < 1e-6  # bf16 weights + fp32 gradient buffer


def test_command_prints_a_layout_that_fits():
    proc = subprocess.run([sys.executable, "bench/scale_model.py", "configs/jamba_v01.yaml", "--gpus", "64", "--top", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| tp")]
    assert len(rows) == 2, proc.stdout
    assert all(float(r.split("|")[11]) <= 80.0 for r in rows)  # the total GB column


def test_widths_find_the_largest_model_that_fits():
    """jamba_like scaled: its own width (1024) fits 8 GPUs; 8192 (164B parameters) does not."""
    proc = subprocess.run([sys.executable, "bench/scale_model.py", "configs/jamba_like.yaml", "--gpus", "8",
                           "--widths", "1024", "8192"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "none fits" not in rows["1024"] and "2.68B" in rows["1024"], proc.stdout
    assert "none fits" in rows["8192"], proc.stdout
