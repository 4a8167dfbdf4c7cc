"""Model FLOPs per token (the MFU numerator) and device bf16 peaks (parameter counts: HybridLM.num_parameters).

Training FLOPs per token = 3 x forward (backward costs two forwards). Forward counts every
matrix multiply as 2 x MACs: the projections (6 x active parameters overall), causal attention
scores and values (2 x seqlen x heads x head_dim per token, half of the full square), and the
SSD terms of the chunked scan per token: groups x Q x N (C^T B, causal half) + heads x (Q x P
(causal half of the intra-chunk product) + 4 x N x P (chunk states and their output)), with Q the
chunk length, N d_state and P head_dim. The formula depends only on the config, never on tp/pp.
"""
from __future__ import annotations

import torch

from pretrain.config import Config, Derived

# dense bf16 tensor-core peaks in TFLOP/s, by substring of torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]


def device_peak_tflops(device: torch.device) -> float | None:
    """bf16 dense peak of the device, or None where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def layer_forward_flops(kind: str, cfg: Config, derived: Derived) -> float:
    """Forward FLOPs per token of one residual sublayer of `kind` (see the module docstring)."""
    m, seqlen = cfg.model, cfg.data.seq_len
    d = m.d_model
    mb, at = m.mamba, m.attention
    if kind == "mamba":
        d_in_proj = 2 * derived.mamba_d_inner + 2 * mb.num_groups * mb.d_state + mb.num_heads
        q = min(mb.chunk_size, seqlen)
        return (2.0 * d * d_in_proj + 2.0 * derived.mamba_d_inner * d + 2.0 * mb.d_conv * derived.mamba_conv_dim
                + mb.num_groups * q * mb.d_state + mb.num_heads * (q * mb.head_dim + 4 * mb.d_state * mb.head_dim))
    if kind == "attention":
        hd = derived.attention_head_dim
        return (2.0 * d * (at.num_heads + 2 * at.num_kv_heads) * hd + 2.0 * at.num_heads * hd * d
                + 2.0 * seqlen * at.num_heads * hd)
    if kind == "mlp":
        return (6.0 if m.mlp.activation == "swiglu" else 4.0) * d * m.mlp.d_ff
    if kind == "moe":
        per_ff = 6.0 if m.moe.activation == "swiglu" else 4.0
        total = 2.0 * d * m.moe.num_experts + m.moe.top_k * per_ff * d * m.moe.d_ff
        if m.moe.num_shared_experts:
            total += per_ff * d * derived.moe_shared_d_ff
        return total
    raise ValueError(f"unknown layer kind {kind!r}")


def head_forward_flops(cfg: Config) -> float:
    """Forward FLOPs per token of the LM head."""
    return 2.0 * cfg.model.d_model * cfg.model.vocab_size


def forward_flops_per_token(cfg: Config, derived: Derived) -> float:
    return head_forward_flops(cfg) + sum(layer_forward_flops(kind, cfg, derived) for kind in derived.layer_kinds)


def train_flops_per_token(cfg: Config, derived: Derived) -> float:
    return 3.0 * forward_flops_per_token(cfg, derived)
