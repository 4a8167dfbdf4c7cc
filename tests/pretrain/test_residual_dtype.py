"""trainer.residual_in_fp32: under bf16 autocast the single-process engine keeps the residual stream in
bf16 (null, the default, and false: Megatron-LM's default) or in float32 (true). CPU bf16 autocast, a tiny model with
every block kind (Mamba, attention, MLP, MoE): each block's input has the chosen dtype, and the bf16
stream's loss and gradients follow the float32 stream's within bf16 noise (the stream rounded to 8
bits after each of 4 blocks: a few 2^-9 relative)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_config  # noqa: E402

from pretrain.config import ConfigError, validate  # noqa: E402


def _run(setting: str):
    """(dtypes of the blocks' inputs, loss, every parameter's gradient) of one bf16 micro-batch."""
    from parallel.engine import Engine

    cfg = tiny_config("data.micro_batch_size=2", "data.global_batch_size=2", f"trainer.residual_in_fp32={setting}")
    torch.manual_seed(0)
    engine = Engine(cfg, validate(cfg, 1), torch.device("cpu"), torch.bfloat16)
    dtypes = []
    for block in engine.model.blocks():
        block.register_forward_pre_hook(lambda _m, args: dtypes.append(args[0].dtype))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=g)
    seq_idx = (torch.arange(cfg.data.seq_len) >= 11).int().expand(2, -1).contiguous()
    loss = float(engine.forward_backward({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "seq_idx": seq_idx}, 1.0))
    return dtypes, loss, {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def test_the_residual_stream_takes_the_chosen_dtype_and_follows_float32():
    dtypes32, loss32, grads32 = _run("true")
    dtypes16, loss16, grads16 = _run("null")
    assert dtypes32 == [torch.float32] * 4
    assert _run("false")[0] == dtypes16
    assert dtypes16 == [torch.bfloat16] * 4  # the MoE block's float32 combine is rounded back after its sum
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert grads16.keys() == grads32.keys()
    for name in grads32:
        torch.testing.assert_close(grads16[name], grads32[name], rtol=5e-2, atol=3e-3, msg=name)


def test_a_float32_stream_is_refused_outside_the_single_process_engine():
    with pytest.raises(ConfigError, match="trainer.residual_in_fp32"):
        validate(tiny_config("trainer.residual_in_fp32=true", "trainer.engine=megatron"), 1)
    with pytest.raises(ConfigError, match="single-process engine only"):
        validate(tiny_config("trainer.residual_in_fp32=true", "data.global_batch_size=16"), 2)
    validate(tiny_config("trainer.residual_in_fp32=false", "trainer.engine=megatron"), 1)  # bf16 there anyway
