"""trainer.compile: torch.compile of each residual block (single-process build) trains like eager.

CPU: float32, the losses of a few optimizer steps equal the eager engine's to float32 rounding
(inductor reorders sums). GPU (`-m gpu`): bf16 autocast with the Triton kernels inside the compiled
blocks, within bf16 noise of eager. Both also with the recompute parts (trainer.recompute=mlp_act,...),
whose autograd functions run outside the compiled graphs, and with whole blocks recomputed (full); and
with gradient accumulation fusion forced on (its default is off at one micro-batch per step).
The first compile of the tiny model takes 10-100 s on CPU.
"""
from __future__ import annotations

import pytest
import torch

from parallel.engine import Engine
from pretrain.config import load_config, validate

OVERRIDES = ["data.path=unused", "model.pattern=M*-E", "model.d_model=32", "model.vocab_size=64",
             "model.mamba.num_heads=4", "model.mamba.head_dim=8", "model.mamba.num_groups=2", "model.mamba.d_state=8",
             "model.mamba.chunk_size=8", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
             "model.mlp.d_ff=48", "model.moe.num_experts=4", "model.moe.d_ff=24", "data.seq_len=16",
             "data.micro_batch_size=2", "data.global_batch_size=2"]


def _losses(compile_blocks: bool, device: torch.device, steps: int, extra: tuple[str, ...] = ()) -> list[float]:
    cfg = load_config([], OVERRIDES + list(extra) + [f"trainer.compile={str(compile_blocks).lower()}"])
    torch.manual_seed(0)
    engine = Engine(cfg, validate(cfg, 1), device, torch.bfloat16 if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=g)
        seq_idx = (torch.arange(cfg.data.seq_len) >= 7).int().expand(2, -1).contiguous()  # two documents
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": seq_idx}
        losses.append(float(engine.forward_backward({k: v.to(device) for k, v in batch.items()}, 1.0)))
        engine.step(3e-3)
    return losses


# recomputation changes what is kept, not the math: compiled with it trains like eager without.
# The parts' autograd functions run outside the compiled graphs; recompute=full checkpoints whole
# compiled blocks (the policy bench/loss_parity.py trains hybrid_460m with).
PARTS = ("trainer.recompute=mlp_act,mamba_norm,mamba_conv,mamba_states",)
FULL = ("trainer.recompute=full",)
# gradient accumulation fusion (off by default here: one micro-batch per step): its in-place
# weight-gradient op inside the compiled backward graphs, with and without the recomputed linears
FUSED = ("trainer.gradient_accumulation_fusion=true",)


@pytest.mark.slow
@pytest.mark.parametrize("parts", [(), PARTS, FULL, FUSED, PARTS + FUSED],
                         ids=["plain", "recompute_parts", "recompute_full", "fused", "fused_recompute_parts"])
def test_compiled_blocks_train_like_eager_on_cpu(parts):
    torch._dynamo.reset()
    eager, compiled = _losses(False, torch.device("cpu"), 4), _losses(True, torch.device("cpu"), 4, parts)
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("parts", [(), PARTS, FULL, FUSED, PARTS + FUSED],
                         ids=["plain", "recompute_parts", "recompute_full", "fused", "fused_recompute_parts"])
def test_compiled_blocks_train_like_eager_on_gpu_bf16(parts):
    torch._dynamo.reset()
    extra = ("model.d_model=64", "model.mamba.head_dim=16", "model.mamba.d_state=16", "model.mamba.chunk_size=16",
             "model.mlp.d_ff=128", "model.moe.d_ff=64", "data.seq_len=64")
    eager = _losses(False, torch.device("cuda"), 6, extra)
    compiled = _losses(True, torch.device("cuda"), 6, extra + parts)
    assert compiled == pytest.approx(eager, rel=2e-2)  # bf16: ~3 significant digits per op
