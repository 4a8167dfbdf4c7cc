"""Shared helpers for the Triton kernels: interpreter detection, launch-config tables, dtypes.

Owns the rules every kernel folder follows:
- under TRITON_INTERPRET=1 (CPU) a single config is used (autotuning cannot run there);
- on CUDA, `autotune(configs, key)` wraps triton.autotune with a small config list and
  `cache_results=True` (Triton's on-disk autotune cache: the benchmark runs once per machine and
  shape key, not on every process of a job) where the installed Triton supports it;
- no torch.cuda calls are made unless the tensors are on CUDA.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# KERNELS_AUTOTUNE=0: use each kernel's first config on CUDA too (quick test runs, no tuning)
AUTOTUNE = os.environ.get("KERNELS_AUTOTUNE", "1") != "0"

_AUTOTUNE_HAS_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs, key, interpret_config=None, **kw):
    """triton.autotune on GPU; under the interpreter a single config (the first, or `interpret_config`)."""
    if INTERPRET or not AUTOTUNE:
        return triton.autotune(configs=[interpret_config or configs[0]], key=key, **kw)
    if _AUTOTUNE_HAS_CACHE:
        kw.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kw)


def autotune_per_chunk(kernel, configs, key, chunk_params):
    """`autotune(configs, key)(kernel)` per chunk size: call the result with the chunk size to get the
    launcher. The block sizes named in `chunk_params` tile a chunk's positions and must not exceed the
    chunk size (a tile would run into the next chunk and write its rows: wrong results, silently), so
    they are clamped to it, duplicate configs dropped. Triton's own pruning is not used because it is
    skipped when a single config is left (the interpreter, KERNELS_AUTOTUNE=0)."""
    launchers = {}

    def for_chunk(chunk_size: int):
        if chunk_size not in launchers:
            clamped, seen = [], set()
            for cfg in configs:
                kw = {k: (min(v, chunk_size) if k in chunk_params else v) for k, v in cfg.kwargs.items()}
                sig = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
                if sig not in seen:
                    seen.add(sig)
                    clamped.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            launchers[chunk_size] = autotune(clamped, key=key)(kernel)
        return launchers[chunk_size]

    return for_chunk


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (exact like the reference); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
