"""bench/mamba_core.py on the CPU (its timing needs CUDA): the case it builds has the preset's mixer
sizes and Mamba layer count, worked out by hand, and its two cores compute the same thing (on the CPU
both run the PyTorch references, so the same bits)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.mamba_core import core_case, separate_ops  # noqa: E402
from kernels.mamba_inner.op import mamba_inner  # noqa: E402


def test_hybrid_1b3_case_and_both_cores_agree():
    leaves, kw, layers = core_case(str(ROOT / "configs/hybrid_1b3.yaml") + ":data.seq_len=64,data.micro_batch_size=2",
                                   "cpu", torch.float32, recompute=False)
    # 64 heads x 64, one group, d_state 128: 2*4096 + 2*128 + 64 packed channels; 21 Mamba layers
    assert leaves[0].shape == (2, 64, 2 * 4096 + 2 * 128 + 64) and leaves[1].shape == (4096 + 2 * 128, 4)
    assert layers == 21
    assert kw["seq_idx"][0].unique().tolist() == [0, 1, 2, 3]  # four documents per row
    assert torch.equal(separate_ops(*leaves, **kw), mamba_inner(*leaves, **kw))
