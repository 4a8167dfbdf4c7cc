"""Shared helpers for the Triton kernels: interpreter detection, launch-config tables, dtypes.

Owns the rules every kernel folder follows:
- under TRITON_INTERPRET=1 (CPU) a single config is used (autotuning cannot run there);
- on CUDA, `autotune(configs, key)` wraps triton.autotune with a small config list and
  `cache_results=True` (Triton's on-disk autotune cache under TRITON_CACHE_DIR: the benchmark runs
  once per cache directory and shape key, not on every run of a job) where the installed Triton
  supports it; with `kernels.deterministic` the first config of each list is used instead (fixed
  bits across nodes and runs, no benchmarking at start-up);
- no torch.cuda calls are made unless the tensors are on CUDA.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

from kernels.backend import get_deterministic

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# KERNELS_AUTOTUNE=0: use each kernel's first config on CUDA too (quick test runs, no tuning)
AUTOTUNE = os.environ.get("KERNELS_AUTOTUNE", "1") != "0"

_AUTOTUNE_HAS_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


class _Launcher:
    """`launcher[grid](*args)` like a triton.autotune'd kernel, choosing per call between the tuned
    variant and the fixed one (the first config): `kernels.set_deterministic(True)` takes the fixed
    one, so the launch configs, and with them the summation order inside each program, do not depend
    on a timing race (the same bits on every node and every run), and nothing is benchmarked."""

    def __init__(self, tuned, fixed):
        self.tuned, self.fixed = tuned, fixed

    def __getitem__(self, grid):
        return (self.fixed if get_deterministic() else self.tuned)[grid]


def autotune(configs, key, interpret_config=None, **kw):
    """Decorator: triton.autotune over `configs` on GPU (cached on disk where Triton supports it),
    or the first config alone when kernels.deterministic is set; under the interpreter or with
    KERNELS_AUTOTUNE=0 always a single config (the first, or `interpret_config` in the interpreter)."""

    def wrap(kernel):
        first = (interpret_config or configs[0]) if INTERPRET else configs[0]
        fixed = triton.autotune(configs=[first], key=key, **kw)(kernel)
        if INTERPRET or not AUTOTUNE or len(configs) == 1:
            return _Launcher(fixed, fixed)
        tune_kw = dict(kw, cache_results=True) if _AUTOTUNE_HAS_CACHE else kw
        return _Launcher(triton.autotune(configs=configs, key=key, **tune_kw)(kernel), fixed)

    return wrap


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
