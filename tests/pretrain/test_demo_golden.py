"""Golden losses of the first 20 demo steps (CPU, float32, deterministic), and that the loss falls.

The demo corpus is this Python's own standard library, so the golden file records the Python and
torch versions it was made with; elsewhere the comparison is skipped (the falling-loss check still
runs). Regenerate after an intended change of the training math:
    python tests/pretrain/test_demo_golden.py --regenerate
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_demo_losses.json")
STEPS = 20


def run_demo(run_dir: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[float]:
    env = {**os.environ, "TMPDIR": str(run_dir)}
    cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/demo.yaml", f"trainer.max_steps={steps}",
           "trainer.log_interval=1", f"run.dir={run_dir}", "run.name=golden", "checkpoint.interval=0", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "golden" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records]


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__.split("+")[0]}


def test_demo_golden_losses(tmp_path):
    losses = run_demo(tmp_path)
    assert len(losses) == STEPS
    # byte-level: starts near ln(257) = 5.55 and falls well below the unigram entropy of source code
    assert 5.0 < losses[0] < 6.0
    assert losses[-1] < 3.3
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():
        pytest.skip(f"golden losses were recorded with {golden['environment']}, this is {environment()}")
    # float32 on CPU with a fixed thread count is deterministic; the tolerance only absorbs the
    # summation-order differences of other BLAS builds (~1e-6 relative per step, compounding)
    assert losses == pytest.approx(golden["losses"], rel=2e-4, abs=2e-4)


@pytest.mark.slow
def test_megatron_engine_in_one_process_follows_the_golden_losses(tmp_path):
    """trainer.engine=megatron without a launcher: a 1-rank process group, megatron DDP and its
    distributed optimizer (float32 on CPU) train the demo like the single-process build."""
    losses = run_demo(tmp_path, steps=5, extra=("trainer.engine=megatron", "checkpoint.async_save=false"))
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():
        pytest.skip(f"golden losses were recorded with {golden['environment']}, this is {environment()}")
    assert losses == pytest.approx(golden["losses"][:5], rel=2e-4, abs=2e-4)


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        values = run_demo(Path(tmp))
    GOLDEN.write_text(json.dumps({"environment": environment(), "losses": values}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {values}")
