"""bench/train.py's `config:overrides` spec: overrides split at commas, comma-separated values kept whole."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from train import split_overrides  # noqa: E402


def test_comma_separated_values_stay_with_their_key():
    assert split_overrides("data.micro_batch_size=16,trainer.recompute=mamba,moe,trainer.max_steps=5") == [
        "data.micro_batch_size=16", "trainer.recompute=mamba,moe", "trainer.max_steps=5"]
    assert split_overrides("") == []
    assert split_overrides("trainer.recompute=full") == ["trainer.recompute=full"]
