"""bench/compile_graphs.py on the CPU (`--device cpu`, the PyTorch reference kernels, a smoke test of
the script, not a measurement): it prints one row per block kind of the pattern, and the Mamba, MLP
and attention blocks are one dynamo graph each (attention's deliberate host sync comes before it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ("configs/hybrid_460m.yaml:kernels.backend=torch,data.micro_batch_size=2,data.seq_len=48,model.d_model=64,"
        "model.mamba.num_heads=4,model.mamba.head_dim=16,model.mamba.d_state=16,model.mamba.chunk_size=16,"
        "model.attention.num_heads=4,model.attention.num_kv_heads=2,model.mlp.d_ff=96,"
        "trainer.recompute=mlp_act,mamba_conv")


def test_compile_graphs_prints_a_row_per_block_kind():
    proc = subprocess.run([sys.executable, "bench/compile_graphs.py", SPEC, "--device", "cpu", "--iters", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| block")}
    assert set(rows) == {"mamba", "attention", "mlp"}, proc.stdout
    for kind in ("mamba", "mlp", "attention"):
        assert rows[kind][:2] == ["1", "0"], proc.stdout
    assert "recompute=mlp_act,mamba_conv" in proc.stdout
