"""bench/train.py on the CPU (`--device cpu`, a smoke test, not a measurement): the GPU sessions that
run it are short, so a broken row or option must show here first. A row builds the real trainer,
a step of `--accum N` consumes N micro-batches and makes one optimizer step, and the table prints."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from train import build_trainer, run_row  # noqa: E402

SPEC = "configs/demo.yaml:data.micro_batch_size=2,data.seq_len=64,model.pattern=M*-E"


def test_accum_step_takes_n_micro_batches_and_one_optimizer_step(tmp_path):
    trainer = build_trainer(str(ROOT / SPEC), "torch", 4, tmp_path, 3, torch.device("cpu"))
    assert trainer.derived.grad_accum_steps == 3
    assert trainer.derived.tokens_per_step == 3 * 2 * 64
    calls = {"batches": 0, "steps": 0}
    next_batch, step = trainer.next_batch, trainer.engine.step

    def counting_batch():
        calls["batches"] += 1
        return next_batch()

    def counting_step(*a, **k):
        calls["steps"] += 1
        return step(*a, **k)

    trainer.next_batch, trainer.engine.step = counting_batch, counting_step
    trainer.train_step()
    assert calls == {"batches": 3, "steps": 1}


def test_one_row_in_process(tmp_path):
    args = argparse.Namespace(steps=1, warmup=1, split_steps=1, profile=0, accum=2, device="cpu")
    row = run_row(str(ROOT / SPEC), "torch", args, tmp_path)
    assert "error" not in row, row
    assert row["batch"] == "2x64 x2"
    assert row["tok_s"] == pytest.approx(2 * 64 * 2 / (row["step_ms"] / 1e3), rel=1e-9)
    assert row["step_ms"] > 0 and row["fwd+bwd_ms"] > 0 and row["optimizer_ms"] > 0


def test_command_line_prints_the_table(tmp_path):
    """Also --write-tuned: the row's process merges its autotuning choices into the table (none on
    the CPU: the file is written, and the entries already there stay)."""
    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"Some GPU": {"_conv_fwd_kernel": {}}}))
    proc = subprocess.run([sys.executable, "bench/train.py", SPEC, "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--split-steps", "1", "--accum", "2", "--backends", "torch", "--write-tuned", str(table)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| demo")]
    assert len(rows) == 1 and "| torch | 2x64 x2 |" in rows[0], proc.stdout[-3000:]
    assert "'tuned_entries': 0" in proc.stdout
    assert json.loads(table.read_text()) == {"Some GPU": {"_conv_fwd_kernel": {}}}


@pytest.mark.parametrize("flag, value, least", [("--accum", "0", 1), ("--split-steps", "0", 1), ("--warmup", "-1", 0)])
def test_bad_counts_are_refused(flag, value, least):
    proc = subprocess.run([sys.executable, "bench/train.py", SPEC, "--device", "cpu", flag, value], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{flag} must be >= {least}, got {value}" in proc.stderr


def test_profile_categories_name_the_kernels_of_a_hybrid_step():
    """Names as Runs 22 and 23's H100 profiles printed them."""
    from train import kernel_category

    assert kernel_category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "GEMM (cuBLAS)"
    assert kernel_category("_chunk_dx_kernel") == kernel_category("_state_pass_bwd_kernel") == "SSD (Triton)"
    assert kernel_category("_rms_bwd_kernel") == kernel_category("_ce_rows_kernel") == "norm, conv, loss (Triton)"
    assert kernel_category("triton_poi_fused_cat_4") == "Inductor (compiled elementwise)"
    # Run 23's: torch's RMSNorm compiled by Inductor is not the gated-norm Triton kernel
    assert kernel_category("triton_per_fused__fused_rms_norm__fused_rms_norm_backward__to_copy_add_view_1") \
        == kernel_category("triton_red_fused__fused_rms_norm__to_copy_0") == "Inductor (compiled elementwise)"
    assert kernel_category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128") == "attention (flash)"
    assert kernel_category("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits"
                           "<128, 64, 128, 8, 2, 4, 2, false, false, cutlass::bfloat16_t>>") == "attention (flash)"
    assert kernel_category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<") \
        == "optimizer (multi-tensor)"
    assert kernel_category("Memset (Device)").startswith("other")


def test_kernel_rows_are_per_step_and_cut_long_names(capsys):
    """Profiler totals over 2 steps print per step: ms from microseconds, calls halved, names cut at 110."""
    from types import SimpleNamespace

    from train import print_kernel_rows

    long_name = "void at::native::reduce_kernel<" + "x" * 200
    print_kernel_rows("kernel", [SimpleNamespace(key=long_name, self_device_time_total=3000.0, count=8)], steps=2)
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header == "| kernel | ms/step | calls/step |" and rule == "|---|---|---|"
    assert row == f"| {long_name[:110]} | 1.50 | 4 |"
