"""Small configs for model tests."""
from __future__ import annotations

from pretrain.config import Config, load_config, validate


def tiny_config(*overrides: str) -> Config:
    base = [
        "data.path=unused", "model.d_model=32", "model.vocab_size=64", "model.pattern=M*-E",
        "model.mamba.num_heads=4", "model.mamba.head_dim=8", "model.mamba.num_groups=2", "model.mamba.d_state=8",
        "model.mamba.chunk_size=8", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
        "model.mlp.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ff=24",
        "data.seq_len=32",
    ]
    return load_config([], base + list(overrides))


def tiny_model(*overrides: str):
    from pretrain.model import HybridLM

    cfg = tiny_config(*overrides)
    return cfg, HybridLM(cfg.model, validate(cfg))
