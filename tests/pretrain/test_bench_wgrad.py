"""bench/wgrad.py's shape census on the CPU (the timing itself needs CUDA): the Linear shapes of a
preset and how many layers have each, against the numbers worked out from the preset by hand; the
routed experts (grouped GEMMs, not fused) are left out."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.wgrad import weight_shapes  # noqa: E402


def test_hybrid_1b3_shapes():
    # pattern: 21 M, 3 *, 24 -; d_model 2048; Mamba 64 heads x 64, 1 group, d_state 128;
    # attention 16 heads, 8 kv heads, head_dim 2048 / 16 = 128; SwiGLU d_ff 3584; micro-batch 4 x 4096
    shapes, rows = weight_shapes(str(ROOT / "configs/hybrid_1b3.yaml"))
    in_proj = 2 * 64 * 64 + 2 * 1 * 128 + 64
    assert rows == 4 * 4096
    assert shapes == {
        (in_proj, 2048): 21, (2048, 64 * 64): 21,            # in_proj, out_proj
        (16 * 128, 2048): 3 + 3, (8 * 128, 2048): 3 + 3,     # q and o (both 2048 x 2048), k, v
        (3584, 2048): 2 * 24, (2048, 3584): 24,              # up and gate, down
    }


def test_routed_experts_are_left_out():
    shapes, _ = weight_shapes(str(ROOT / "configs/hybrid_1b3.yaml") + ":model.pattern=M-ME,model.moe.d_ff=1000")
    assert (1000, 2048) not in shapes and (2048, 1000) not in shapes
    assert shapes[(3584, 2048)] == 2  # the dense MLP's up and gate
