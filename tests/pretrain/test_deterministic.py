"""trainer.deterministic: torch's deterministic algorithms, cuBLAS's fixed workspace, no cuDNN
autotuning and the Triton kernels' fixed configs are switched on for the process; on the CPU's
float32 path the losses are those of an ordinary run (the mode changes which algorithms run, not
what they compute there), and no op of the training step lacks a deterministic implementation.
In a subprocess: torch's mode is process-wide and must not leak into other tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, os, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
from bench.loss_parity import losses_of
import kernels.backend as kb
out = {}
with tempfile.TemporaryDirectory() as tmp:
    out["plain"] = losses_of("configs/demo.yaml", ["kernels.backend=torch"], 3, 20, Path(tmp), "plain")
    out["plain_mode"] = [torch.are_deterministic_algorithms_enabled(), kb.get_deterministic()]
    out["det"] = losses_of("configs/demo.yaml", ["kernels.backend=torch", "trainer.deterministic=true"], 3, 20,
                           Path(tmp), "det")
import torch._inductor.config as ic
out["det_mode"] = [torch.are_deterministic_algorithms_enabled(), kb.get_deterministic(),
                   torch.backends.cudnn.deterministic, not torch.backends.cudnn.benchmark,
                   os.environ.get("CUBLAS_WORKSPACE_CONFIG"), getattr(ic, "deterministic", True)]
print("JSON:" + json.dumps(out))
"""


def test_deterministic_mode_is_applied_and_keeps_the_cpu_losses():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("JSON:", 1)[1])
    assert out["plain_mode"] == [False, False]
    assert out["det_mode"] == [True, True, True, True, ":4096:8", True]
    assert len(out["det"]) == 3 and out["det"] == out["plain"]
