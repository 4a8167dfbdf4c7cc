"""bench/kernels.py's `--breakdown` (and bench/kernel_configs.py's `--order`, `--configs`) calls the SSD kernels' launchers directly and launches the gated-norm
backward and the conv forward under each schedule the autotuner chooses from; this runs both on the
CPU under the Triton interpreter (float32, tiny shapes) in a subprocess, so that a change to a
launcher's signature or return values shows in CI, not in a short GPU session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import importlib.util, json, torch
spec = importlib.util.spec_from_file_location("bench_kernels", "bench/kernels.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
parts = mod.breakdown(1, 40, 4, 8, 2, 8, q=16, dev="cpu", dt_=torch.float32)
sched = mod.schedules(1, 40, 64, 80, dev="cpu", dt_=torch.float32)
first = mod.first_call_seconds(dev="cpu", ssd_shape=(1, 40, 4, 8, 2, 8), mixer=(1, 20, 32, 48), q=16,
                               dt_=torch.float32, documents=2)
splits = mod.breakdown(1, 40, 4, 8, 2, 8, q=16, dev="cpu", dt_=torch.float32, splits_only=True)
import bench.kernel_configs as sweeps
order = sweeps.launch_order(1, 40, 4, 8, 2, 8, q=16, dev="cpu", dt_=torch.float32)
configs = sweeps.config_sweep(1, 40, 4, 8, 2, 8, q=16, documents=2, dev="cpu", dt_=torch.float32)
table = sweeps.config_table({name: [ms, 2 * ms] for name, ms in configs}, ["one shape", "another"])
print("JSON:" + json.dumps({"parts": parts, "schedules": sched, "first": first, "splits": splits, "order": order,
                            "configs": configs, "table": table, "row_kernels": [sweeps.row_kernel(n) for n, _ in configs]}))
"""


def test_breakdown_runs_every_kernel_launch_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("JSON:", 1)[1])
    parts = out["parts"]
    assert [name for name, _ in parts] == [
        "fwd dt_cumsum", "fwd CB", "fwd chunk states", "fwd state passing", "fwd chunk scan", "fwd chunk scan fixed",
        "bwd dprev", "bwd state passing", "bwd dx/ddt", "bwd dx/ddt fixed", "bwd dCB", "bwd dB/dC",
        "bwd dCB blocked", "bwd dCB head-pipe",
        "bwd dCB head-pipe split", "bwd dB/dC blocked", "bwd dB/dC head-pipe", "bwd dt tail",
        "bwd dCB+dB/dC nsplit=1", "bwd dCB+dB/dC nsplit=2 (default)"]  # 4 heads, 2 groups: 2 per group
    assert [name for name, _ in out["splits"]] == ["bwd dCB+dB/dC nsplit=1", "bwd dCB+dB/dC nsplit=2 (default)"]
    assert all(ms > 0 for _, ms in parts)
    assert [name for name, _ in out["order"]] == [
        f"{k} {c} {o}" for c in ("tuned", "fixed") for o in ("heads-fast", "chunks-fast") for k in ("chunk scan", "dx")]
    from kernels.ssd.triton_bwd import _DBC_SPACE, _DCB_SPACE
    from kernels.ssd.triton_bwd_dx import _DX_SPACE
    from kernels.ssd.triton_fwd import _CHUNK_SCAN_SPACE
    from kernels.ssd.triton_states import _chunk_outer_tuned

    names = [name for name, _ in out["configs"]]
    # the labels show the tiles as clamped to the chunk (16) and dstate (8 -> 16) the rows ran
    assert names[0] == "chunk scan tuned" and names[1] == "chunk scan #0 M16,K16,P64,N16,w4,s3"
    assert names[1 + len(_CHUNK_SCAN_SPACE)] == "dx tuned"
    outer = 2 + len(_CHUNK_SCAN_SPACE) + len(_DX_SPACE)
    assert names[outer:outer + 2] == ["chunk states tuned", "chunk states #0 P64,N64,K16,w4,s2"]
    dcb = outer + 2 * (1 + _chunk_outer_tuned.num_configs)
    assert names[dcb - 1 - _chunk_outer_tuned.num_configs] == "dprev tuned"
    assert names[dcb:dcb + 2] == ["dcb tuned", "dcb #0 SPLIT_DECAY0,P64,HEAD_PIPE0,w4,s2"]
    assert "dcb #11 SPLIT_DECAY1,P64,HEAD_PIPE1,HEAD_STAGES3,w8,s3,r128" in names
    assert "dcb #12 SPLIT_DECAY1,P64,HEAD_PIPE1,HEAD_STAGES3,w4,s3" in names
    assert names[dcb + 1 + len(_DCB_SPACE)] == "dbc tuned"
    assert len(names) == dcb + 2 + len(_DCB_SPACE) + len(_DBC_SPACE)
    assert all(ms > 0 for _, ms in out["configs"])
    lines = out["table"].splitlines()
    assert lines[0] == "| kernel, config | one shape | another |" and len(lines) == 2 + len(names)
    kernels = ["chunk scan", "dx", "chunk states", "dprev", "dcb", "dbc"]
    row_kernel = dict(zip(names, out["row_kernels"]))
    assert set(row_kernel.values()) == set(kernels)
    fastest = {k: min(ms for n, ms in out["configs"] if row_kernel[n] == k) for k in kernels}
    for line, (name, ms) in zip(lines[2:], out["configs"]):  # the fastest of each kernel in bold, per column
        bold = ms == fastest[row_kernel[name]]
        assert line.startswith(f"| {name} | ") and line.count("**") == (4 if bold else 0), line
    from kernels.conv1d.triton_op import FWD_SCHEDULES
    from kernels.rmsnorm_gated.triton_op import bwd_schedules

    names = [name for name, _, _ in out["schedules"]]
    assert len(names) == 2 + len(bwd_schedules(64)) + len(FWD_SCHEDULES)
    assert names[0] == "norm bwd tuned" and "conv fwd tuned" in names
    assert all(ms > 0 and nbytes > 0 for _, ms, nbytes in out["schedules"])
    assert out["first"].startswith("first calls") and "SSD f+b" in out["first"]
