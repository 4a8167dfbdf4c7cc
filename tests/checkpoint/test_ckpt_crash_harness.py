"""The crash harness with a few kills (2 ranks): SIGKILL at random moments, also mid-save; every restart
resumes from the newest complete checkpoint; losses and final tensors equal an uninterrupted run.

The full run the issue asks for (50 kills) is `python scripts/crash_harness.py --workdir DIR --kills 50`;
CI runs HP_CRASH_KILLS (default 6) to stay inside its time budget.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_crash_harness(tmp_path):
    kills = int(os.environ.get("HP_CRASH_KILLS", "6"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    cmd = [sys.executable, str(REPO / "scripts" / "crash_harness.py"), "--workdir", str(tmp_path / "work"),
           "--kills", str(kills), "--nproc", "2", "--steps", str(2 * kills + 8), "--interval", "2",
           "--startup-seconds", "4", "--seed", "1", "--life-timeout", "240"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["ok"], proc.stdout[-4000:] + proc.stderr[-2000:]
    assert summary["kills"] == kills and summary["losses_identical"] and summary["final_tensors_identical"]
    assert summary["resumes_checked"] >= kills - summary["modes"].get("startup", 0)
