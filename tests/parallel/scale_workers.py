"""Rank function for tests/parallel/test_scale_model.py: the parameter elements this rank holds."""
from __future__ import annotations

import torch

from parallel import state
from parallel.engine import Engine
from pretrain.config import load_config, validate
from workers import BASE


def elements_per_layout(rank: int, world: int, layouts: list[list[str]]) -> list[int]:
    out = []
    for overrides in layouts:
        cfg = load_config([], BASE + overrides)
        derived = validate(cfg, world)
        state.initialize(cfg, derived)
        eng = Engine(cfg, derived, torch.device("cpu"), parallel=True)
        out.append(sum(p.numel() for p in eng.model.parameters()))
        del eng
        state.destroy()
    return out
