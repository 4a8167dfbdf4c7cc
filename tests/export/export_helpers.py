"""Demo-sized nemotron_h_like models for the export tests, trained a few steps so that every tensor
(biases, D, dt_bias, the experts' score-correction bias) is away from its initial value."""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import Config, load_config, validate
from pretrain.export import save_model_checkpoint
from pretrain.model import HybridLM

REPO = Path(__file__).resolve().parents[2]
PRESET = str(REPO / "configs" / "nemotron_h_like.yaml")
DEMO_SIZE = [
    "data.path=unused", "data.tokenizer=bytes", "data.seq_len=64", "model.d_model=64", "model.vocab_size=264",
    "model.pattern=M-ME*-|MEM*E-", "model.mamba.num_heads=4", "model.mamba.head_dim=16",
    "model.mamba.num_groups=2", "model.mamba.d_state=16", "model.mamba.chunk_size=16",
    "model.attention.num_heads=4", "model.attention.num_kv_heads=2", "model.attention.head_dim=16",
    "model.mlp.d_ff=128", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ff=64",
    "model.moe.shared_d_ff=96", "model.moe.bias_update_rate=0.01", "kernels.backend=torch",
]
# the other branches of the mapping: tied head, no shared expert, top-1 routing, dt floor, biases
VARIANT = [
    "model.tie_embeddings=true", "model.moe.num_shared_experts=0", "model.moe.top_k=1",
    "model.mamba.dt_limit_min=0.01", "model.mamba.proj_bias=true", "model.mamba.conv_bias=false",
    "model.mlp.bias=true", "model.pattern=M*-EM-E", "model.attention.head_dim=null", "model.norm_eps=1e-6",
]


def demo_config(*overrides: str) -> Config:
    return load_config([PRESET], DEMO_SIZE + list(overrides))


def build_model(cfg: Config) -> HybridLM:
    torch.manual_seed(cfg.run.seed)
    return HybridLM(cfg.model, validate(cfg))


def train_steps(model: HybridLM, cfg: Config, steps: int = 3, seed: int = 0) -> None:
    """A few AdamW steps on random byte tokens, with the MoE expert-bias update after each."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        tokens = torch.randint(0, 257, (2, 33), generator=gen)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for layer in model.moe_layers():
            layer.update_expert_bias()


def trained_checkpoint(directory: Path, *overrides: str, steps: int = 3) -> tuple[Config, HybridLM]:
    """model.pt + config.yaml of a demo-sized model trained `steps` steps, in `directory`."""
    cfg = demo_config(*overrides)
    model = build_model(cfg)
    train_steps(model, cfg, steps)
    model.eval()
    save_model_checkpoint(cfg, model.state_dict(), directory)
    return cfg, model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
