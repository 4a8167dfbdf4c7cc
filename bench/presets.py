"""A preset as the benchmarks see it: the `config.yaml[:key=value,...]` spec every bench script
takes, loaded and validated for one process, and the preset's Linear layers counted by name and
shape from its model built on the meta device (no memory), for the GEMM benchmarks
(bench/wgrad.py, bench/fp8_gemm.py).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train import split_overrides  # noqa: E402
from pretrain.config import Config, Derived, load_config, validate  # noqa: E402
from pretrain.layers.linear import FusedLinears  # noqa: E402
from pretrain.model import HybridLM  # noqa: E402


def load_spec(spec: str) -> tuple[Config, Derived]:
    """'config.yaml[:key=value,...]' -> the config with its overrides, validated for one process."""
    path, _, extra = spec.partition(":")
    cfg = load_config([path], split_overrides(extra))
    return cfg, validate(cfg, 1)


def linear_shapes(spec: str, *, with_head: bool = True) -> tuple[int, Counter]:
    """-> (rows per micro-batch, Counter of (name, in_features, out_features) -> how many layers):
    the single-process model's Linear layers that gradient accumulation fusion takes (FusedLinears:
    routed MoE experts left out, their GEMMs grouped over the tokens routed to them), and with
    `with_head` the LM head (an nn.Linear unless tied to the embedding)."""
    cfg, derived = load_spec(spec)
    with torch.device("meta"):
        model = HybridLM(cfg.model, derived, parallel=False)
    names = {id(m): name for name, m in model.named_modules()}
    layers = FusedLinears(model).layers
    if with_head and model.lm_head is not None:
        layers = [*layers, model.lm_head]
    shapes = Counter((names[id(m)].rsplit(".", 1)[-1], m.in_features, m.out_features) for m in layers)
    return cfg.data.micro_batch_size * cfg.data.seq_len, shapes
