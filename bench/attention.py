"""Attention over packed documents: one command on the GPU machine prints one table.

    PYTHONPATH=$PWD python bench/attention.py

For the attention layers of the presets (bf16, GQA) on packed rows with documents of random
length (mean 2048 tokens, like bench/train.py's synthetic data): forward and forward+backward
median time (triton.testing.do_bench, CUDA events) of
  - `mask`:   SDPA with the dense (batch, 1, s, s) document mask (the path before varlen; SDPA
              cannot use its flash kernel with a mask),
  - `varlen`: pretrain.layers.attention.causal_attention, FlashAttention's varlen kernel,
  - `causal`: SDPA causal over whole rows, no documents (flash; more work than varlen since it
              also computes the blocks across documents, but the kernel everyone knows).
TFLOP/s counts the useful causal work within documents only: 4 * sum(len^2)/2 * heads * hd
(forward), x 3.5 for forward+backward (FlashAttention's convention: backward 2.5x forward).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from data.dataset import sample_to_example  # noqa: E402
from data.synthetic import random_doc_starts  # noqa: E402
from pretrain.layers.attention import causal_attention, document_causal_mask, uses_varlen  # noqa: E402

SHAPES = [  # (name, batch, seqlen, heads, kv_heads, head_dim)
    ("hybrid_460m", 8, 4096, 16, 8, 64),
    ("hybrid_1b3", 4, 4096, 16, 8, 128),
    ("jamba_like", 1, 8192, 32, 8, 128),
]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def packed_seq_idx(batch, seqlen, mean_doc_len, rng):
    """seq_idx of `batch` rows drawn like bench/train.py's synthetic data, through the loader's own
    conversion (data/synthetic.py, data/dataset.py)."""
    dummy = np.zeros(seqlen + 1, dtype=np.int64)
    return torch.stack([sample_to_example(dummy, random_doc_starts(rng, seqlen, mean_doc_len))["seq_idx"]
                        for _ in range(batch)])


def useful_flops(seq_idx, heads, head_dim):
    lengths = torch.cat([torch.unique_consecutive(row, return_counts=True)[1] for row in seq_idx]).double()
    return float(4 * (lengths * (lengths + 1) / 2).sum() * heads * head_dim)


def run_case(batch, seqlen, heads, kv_heads, head_dim, rng):
    seq_idx = packed_seq_idx(batch, seqlen, 2048, rng).cuda()
    q = torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    variants = {
        "mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq_idx),
                                                       enable_gqa=True),
        "varlen": lambda: causal_attention(q, k, v, seq_idx),
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    times = {}
    for name, fn in variants.items():
        def fwdbwd(fn=fn):
            torch.autograd.grad(fn(), (q, k, v), dout)
        with torch.no_grad():
            times[name] = (bench(fn), None)
        times[name] = (times[name][0], bench(fwdbwd))
    ref = variants["mask"]()
    err = ((variants["varlen"]() - ref).float().norm() / ref.float().norm()).item()
    return times, useful_flops(seq_idx.cpu(), heads, head_dim), int(seq_idx[:, -1].sum() + batch), err


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, varlen kernel used: "
          f"{uses_varlen(torch.empty(1, device='cuda', dtype=torch.bfloat16))}")
    rng = np.random.default_rng(0)
    print("| preset attention | docs | mask f / f+b ms | varlen f / f+b ms | causal (no docs) f / f+b ms "
          "| varlen TFLOP/s f / f+b | f+b speedup vs mask | varlen vs mask rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, seqlen, heads, kv_heads, head_dim in SHAPES:
        times, flops, docs, err = run_case(batch, seqlen, heads, kv_heads, head_dim, rng)
        cell = {n: f"{t[0]:.3f} / {t[1]:.3f}" for n, t in times.items()}
        vf, vb = times["varlen"]
        print(f"| {name} {batch}x{seqlen}, {heads}q/{kv_heads}kv x {head_dim} | {docs} | {cell['mask']} | "
              f"{cell['varlen']} | {cell['causal']} | {flops / vf / 1e9:.0f} / {3.5 * flops / vb / 1e9:.0f} | "
              f"{times['mask'][1] / vb:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
