"""bench/loss_parity.py's plumbing on CPU: both rows train the demo from the same seed on the same
text, so with the same (PyTorch, float32) path they reproduce the golden demo losses, and the verdict
compares them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import loss_parity  # noqa: E402
from test_demo_golden import GOLDEN, environment  # noqa: E402


def test_rows_follow_the_golden_demo_losses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    code = loss_parity.main([str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"), "--steps", "3", "--warmup-steps", "20",
                             "--fast", "kernels.backend=torch", "--reference", "kernels.backend=torch"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split(": ")[0]: [float(x) for x in line.split(": ")[1].split()]
            for line in out.splitlines() if line.startswith(("fast: ", "reference: "))}
    assert rows["fast"] == rows["reference"]
    assert "fast vs reference: max |d| 0.0000" in out
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():
        pytest.skip(f"golden losses were recorded with {golden['environment']}, this is {environment()}")
    assert rows["fast"] == pytest.approx(golden["losses"][:3], abs=1e-4)


def test_verdict_against_bf16_noise():
    ref = [5.0, 4.0, 3.0]
    yard = [5.0, 4.1, 3.1]  # bf16 noise: 0.1
    assert loss_parity.compare([5.0, 4.05, 3.15], ref, yard, 2.0)[1]
    assert not loss_parity.compare([5.0, 4.5, 3.5], ref, yard, 2.0)[1]
