"""bench/fp8_gemm.py's parts on the CPU (the table itself needs an FP8 GPU): the GEMM shapes it times
are the preset's (bench/presets.linear_shapes), the tensorwise quantization keeps each value to its format's precision, and the
two FP8 GEMMs compute x @ w^T and dy @ w of the dequantized operands."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.fp8_gemm import E4M3, E5M2, fp8_linear_gemms, quantize, weight_casts  # noqa: E402
from bench.presets import linear_shapes  # noqa: E402
from pretrain.config import load_config  # noqa: E402


def test_linear_shapes_are_the_presets_projections():
    tokens, shapes = linear_shapes(str(ROOT / "configs/hybrid_460m.yaml"))
    cfg = load_config([str(ROOT / "configs/hybrid_460m.yaml")])
    m, a, d = cfg.model.mamba, cfg.model.attention, cfg.model.d_model
    pattern = cfg.model.pattern  # M Mamba, * attention, - MLP
    d_inner = m.num_heads * m.head_dim
    head_dim = d // a.num_heads
    assert tokens == cfg.data.micro_batch_size * cfg.data.seq_len
    assert shapes == {
        ("in_proj", d, 2 * d_inner + 2 * m.num_groups * m.d_state + m.num_heads): pattern.count("M"),
        ("out_proj", d_inner, d): pattern.count("M"),
        ("q_proj", d, d): pattern.count("*"), ("o_proj", d, d): pattern.count("*"),
        ("k_proj", d, a.num_kv_heads * head_dim): pattern.count("*"),
        ("v_proj", d, a.num_kv_heads * head_dim): pattern.count("*"),
        ("gate_proj", d, cfg.model.mlp.d_ff): pattern.count("-"), ("up_proj", d, cfg.model.mlp.d_ff): pattern.count("-"),
        ("down_proj", cfg.model.mlp.d_ff, d): pattern.count("-"),
        ("lm_head", d, cfg.model.vocab_size): 1,
    }


def test_quantize_keeps_each_value_to_its_formats_precision():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    t = torch.randn(257, 33, generator=g) * 3
    for dtype, mantissa_bits in ((E4M3, 3), (E5M2, 2)):
        q, inv = quantize(t, dtype)
        assert q.dtype == dtype and inv.dtype == torch.float32 and inv.dim() == 0
        back = q.float() * inv
        # round to nearest: half a unit in the last place; below the smallest normal the units are
        # the subnormals' (smallest_normal x 2^-mantissa_bits, in the scaled domain)
        ulp_floor = torch.finfo(dtype).smallest_normal * 2.0 ** -mantissa_bits * inv
        bound = torch.maximum(t.abs() * 2.0 ** -mantissa_bits, ulp_floor) / 2
        assert ((back - t).abs() <= bound * 1.0001).all()
        # amax maps onto the format's largest value (and back, up to float32's rounding of the scale)
        assert q.float().abs().max() == torch.finfo(dtype).max
        torch.testing.assert_close(back.abs().max(), t.abs().max(), rtol=2e-7, atol=0)
    q, inv = quantize(torch.zeros(4, 4), E4M3)
    assert inv == 1 and (q.float() == 0).all()


def test_fp8_gemms_multiply_the_dequantized_operands():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x, w = torch.randn(96, 64, generator=g), torch.randn(48, 64, generator=g) * 0.02
    dy = torch.randn(96, 48, generator=g) * 1e-3
    x8, x_inv = quantize(x, E4M3)
    dy8, dy_inv = quantize(dy, E5M2)
    w8, w8_t, w_inv = weight_casts(w)
    assert w8_t.is_contiguous() and torch.equal(w8_t.float(), w8.float().t())
    y, dx = fp8_linear_gemms(x8, x_inv, w8, w8_t, w_inv, dy8, dy_inv)
    xr, wr, dyr = x8.float() * x_inv, w8.float() * w_inv, dy8.float() * dy_inv
    # products of fp8 values are exact in float32; the bf16 outputs round once: 2^-8 relative
    for got, want in ((y, xr @ wr.t()), (dx, dyr @ wr)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=want.abs().max().item() * 1e-5)
