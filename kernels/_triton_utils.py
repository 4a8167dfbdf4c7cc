"""Shared helpers for the Triton kernels: interpreter detection, launch-config tables, dtypes.

Owns the rules every kernel folder follows:
- under TRITON_INTERPRET=1 (CPU) a single config is used (autotuning cannot run there);
- on CUDA, `autotune(configs, key)` wraps triton.autotune with a small config list and
  `cache_results=True` (Triton's on-disk autotune cache under TRITON_CACHE_DIR: the benchmark runs
  once per cache directory and shape key, not on every run of a job) where the installed Triton
  supports it; with `kernels.deterministic` the first config of each list is used instead (fixed
  bits across nodes and runs, no benchmarking at start-up);
- on CUDA, a shipped table of tuned choices (`kernels/tuned_configs.json`, per GPU name, kernel and
  shape key; KERNELS_TUNED_TABLE names another file) is consulted before tuning: a listed key
  launches its config directly, with no benchmarking and no compilation of the other configs (the
  first-call stall of a large job with a cold Triton cache). After `record_tuning()`,
  `write_tuned_table` saves the choices the autotuner made in this process (bench/kernels.py and
  bench/train.py --write-tuned, on the GPU);
- `choose_structure` picks between kernel structures for the same result (the SSD backward's split
  of a group's heads over programs) by timing each once per shape key, on CUDA only;
- no torch.cuda calls are made unless the tensors are on CUDA.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels.backend import get_deterministic

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# KERNELS_AUTOTUNE=0: use each kernel's first config on CUDA too (quick test runs, no tuning)
AUTOTUNE = os.environ.get("KERNELS_AUTOTUNE", "1") != "0"

_AUTOTUNE_HAS_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


TABLE_PATH = Path(os.environ.get("KERNELS_TUNED_TABLE", Path(__file__).with_name("tuned_configs.json")))
_table: dict | None = None  # {gpu name: {kernel: {key: {"kwargs": .., "num_warps": .., "num_stages": ..}}}}
_launchers: list["_Launcher"] = []  # every autotuned launcher of this process, for write_tuned_table
_record = False  # remember the autotuner's choices (record_tuning(); the benchmarks' --write-tuned)
_names: dict[int, str] = {}


def record_tuning() -> None:
    """From now on remember each autotuned choice of this process for write_tuned_table."""
    global _record
    _record = True


def _load_table() -> dict:
    global _table
    if _table is None:
        _table = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
    return _table


def _device_name(args) -> str | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            index = a.device.index if a.device.index is not None else torch.cuda.current_device()
            if index not in _names:
                _names[index] = torch.cuda.get_device_name(index)
            return _names[index]
    return None


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the table's spelling), remembered."""
    return _DTYPE_NAMES.setdefault(dtype, str(dtype).replace("torch.", ""))


class _Launcher:
    """`launcher[grid](*args)` like a triton.autotune'd kernel, choosing per call between:
    - the fixed variant (the first config) under `kernels.set_deterministic(True)`: the launch
      configs, and with them the summation order inside each program, do not depend on a timing race
      (the same bits on every node and every run), and nothing is benchmarked;
    - the table's config for this GPU, kernel and key (`key` names the kernel arguments whose values,
      with the dtypes of the tensor arguments, make the key, as Triton's own autotuner keys);
    - the tuned variant otherwise, whose choice is remembered for write_tuned_table."""

    def __init__(self, tuned, fixed, kernel=None, key=()):
        self.tuned, self.fixed, self.kernel, self.key = tuned, fixed, kernel, tuple(key)
        self.name = getattr(kernel, "__name__", "")
        self.chosen: dict[str, dict[str, triton.Config]] = {}  # gpu name -> key string -> config
        # the sets of meta-parameters the configs set: a table entry setting another set is from an
        # older kernel (a config may leave a meta-parameter to the kernel's default)
        self.config_keys = {frozenset(cfg.kwargs) for cfg in getattr(tuned, "configs", ())}
        self.resolved: dict[tuple[str, str], triton.Config | None] = {}  # (gpu, key) -> the table's config
        if kernel is not None:
            names = list(kernel.arg_names)
            self.key_positions = [(k, names.index(k) if k in names else None) for k in self.key]
            _launchers.append(self)

    def key_string(self, args, kwargs) -> str:
        """`k=value` for each key argument present, then the dtypes of the tensor arguments (the
        table's key; built on every launch that consults the table, so no dict of all arguments)."""
        parts = [f"{k}={kwargs[k] if k in kwargs else args[i]}" for k, i in self.key_positions
                 if k in kwargs or (i is not None and i < len(args))]
        parts += [_DTYPE_NAMES.get(v.dtype) or _dtype_name(v.dtype) for v in (*args, *kwargs.values())
                  if isinstance(v, torch.Tensor)]
        return ",".join(parts)

    def table_config(self, gpu: str, key: str, listed: dict) -> triton.Config | None:
        """The table's config for this key, resolved once: None where unlisted, or where the entry
        sets other meta-parameters than this kernel's configs do (a table written by another
        version of the kernel: ignored with one warning, the autotuner chooses)."""
        if (gpu, key) not in self.resolved:
            entry, cfg = listed.get(key), None
            if entry is not None and self.config_keys and frozenset(entry["kwargs"]) not in self.config_keys:
                sets = " or ".join(str(sorted(keys)) for keys in sorted(self.config_keys, key=sorted))
                warnings.warn(f"{TABLE_PATH}: the entry for {self.name} ({key}) sets {sorted(entry['kwargs'])}, "
                              f"but this kernel's configs set {sets} (a table from another "
                              f"version of the kernel): ignored, the autotuner chooses", stacklevel=3)
            elif entry is not None:
                cfg = triton.Config(entry["kwargs"], num_warps=entry["num_warps"], num_stages=entry["num_stages"],
                                    maxnreg=entry.get("maxnreg"))
            self.resolved[gpu, key] = cfg
        return self.resolved[gpu, key]

    def __getitem__(self, grid):
        if get_deterministic():
            return self.fixed[grid]
        if self.kernel is None:
            return self.tuned[grid]

        def run(*args, **kwargs):
            gpu = _device_name(args)
            listed = _load_table().get(gpu, {}).get(self.name) if gpu is not None else None
            if not listed and not _record:  # nothing to look up or remember: no key to build
                return self.tuned[grid](*args, **kwargs)
            key = self.key_string(args, kwargs)
            cfg = self.table_config(gpu, key, listed) if listed else None
            if cfg is not None:
                return launch_with(self.kernel, cfg, grid, args, kwargs)
            out = self.tuned[grid](*args, **kwargs)
            best = getattr(self.tuned, "best_config", None)
            if _record and gpu is not None and best is not None:
                self.chosen.setdefault(gpu, {})[key] = best
            return out

        return run


def write_tuned_table(path: Path | str = TABLE_PATH) -> int:
    """Merge the choices the autotuner made in this process into the table at `path` (per GPU name,
    kernel and key; existing entries for other keys stay). Returns the number of entries written."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    n = 0
    for launcher in _launchers:
        for gpu, keys in launcher.chosen.items():
            for key, cfg in keys.items():
                table.setdefault(gpu, {}).setdefault(launcher.name, {})[key] = {
                    "kwargs": dict(cfg.kwargs), **launch_options(cfg)}
                n += 1
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return n


def _benchmarker():
    """Triton's own benchmark function for the active GPU (triton.testing.do_bench on CUDA)."""
    return triton.runtime.driver.active.get_benchmarker()


def skipping_failed_compiles(name: str):
    """The autotuner's benchmark function for kernel `name`, except that a config whose compilation
    fails in one of Triton's MLIR passes ("PassManager::run failed": a compiler bug that depends on
    the Triton version, the GPU and the specialised arguments) is skipped with a warning, timed as
    infinitely slow, instead of ending the process. Triton itself skips only configs that run out of
    resources. The fixed config (kernels.deterministic) gets no such fallback: the CPU test
    tests/kernels/test_sm90_compile.py compiles it for Hopper."""

    def bench(kernel_call, quantiles):
        try:
            return _benchmarker()(kernel_call, quantiles=quantiles)
        except RuntimeError as e:
            if "PassManager" not in str(e):
                raise
            warnings.warn(f"{name}: a config failed to compile ({e}); the autotuner skips it", stacklevel=2)
            return [float("inf")] * len(quantiles)

    return bench


def autotune(configs, key, interpret_config=None, **kw):
    """Decorator: triton.autotune over `configs` on GPU (cached on disk where Triton supports it,
    and looked up first in the shipped table), or the first config alone when kernels.deterministic
    is set; under the interpreter or with KERNELS_AUTOTUNE=0 always a single config (the first, or
    `interpret_config` in the interpreter)."""

    def wrap(kernel):
        first = (interpret_config or configs[0]) if INTERPRET else configs[0]
        fixed = triton.autotune(configs=[first], key=key, **kw)(kernel)
        if INTERPRET or not AUTOTUNE or len(configs) == 1:
            return _Launcher(fixed, fixed)
        tune_kw = dict(kw, do_bench=skipping_failed_compiles(getattr(kernel, "__name__", "kernel")))
        if _AUTOTUNE_HAS_CACHE:
            tune_kw["cache_results"] = True
        return _Launcher(triton.autotune(configs=configs, key=key, **tune_kw)(kernel), fixed, kernel, key)

    return wrap


_structures: dict[tuple, str] = {}  # (name, key) -> the option choose_structure timed fastest


def choose_structure(name: str, key: tuple, labels: tuple, run, default, device: torch.device):
    """Which of several ways to compute the same thing (`labels`; `run(label)` computes it that way)
    this process uses for `key`: on CUDA, the fastest of them, timed once per key with CUDA events
    (triton.testing.do_bench: a few ms at the first call, like the autotuner's benchmark);
    `default()` under the interpreter, off CUDA, with KERNELS_AUTOTUNE=0 or kernels.deterministic
    (fixed bits, nothing timed). Called on every launch, so the hot path is one dict lookup: `run`
    is only called on the first call per key, `default` only where nothing is timed."""
    if INTERPRET or not AUTOTUNE or get_deterministic() or device.type != "cuda":
        return default()
    chosen = _structures.get((name, key))
    if chosen is None:
        from triton.testing import do_bench

        times = {label: do_bench(lambda label=label: run(label), warmup=5, rep=20) for label in labels}
        chosen = _structures[name, key] = min(times, key=times.get)
    return chosen


def configs_of(space) -> list:
    """A launch-config space written as [(kwargs, num_warps, num_stages[, maxnreg])] as triton.Configs
    (maxnreg: a cap on registers per thread, which ptxas meets by spilling if it must)."""
    return [triton.Config(c[0], num_warps=c[1], num_stages=c[2], maxnreg=c[3] if len(c) > 3 else None)
            for c in space]


def launch_options(cfg: triton.Config) -> dict:
    """A config's launch options as kernel-call keywords (maxnreg only where the config caps registers)."""
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg is not None:
        opts["maxnreg"] = cfg.maxnreg
    return opts


def launch_with(kernel, cfg: triton.Config, grid, args, kwargs):
    """kernel[grid](*args, **kwargs) at one config, no tuning: `grid` a tuple or, as for Triton's
    autotuner, a function of the meta-parameters."""
    g = grid({**kwargs, **cfg.kwargs}) if callable(grid) else grid
    return kernel[g](*args, **kwargs, **cfg.kwargs, **launch_options(cfg))


class _OneConfig:
    """`launcher[grid](*args)` at one fixed config (autotune_per_chunk's `with_config`)."""

    def __init__(self, kernel, cfg: triton.Config):
        self.kernel, self.cfg = kernel, cfg

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launch_with(self.kernel, self.cfg, grid, args, kwargs)


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third axes (the first allows 2^31 - 1)


# The launch order of the SSD kernels whose programs run per (chunk, head) and read a per-group
# float32 CB tile (chunk scan, dx): with the heads in grid axis 1 and the chunks in axis 2, the
# programs the GPU runs together are the heads of one chunk, which share the chunk's CB tile (and
# B, C rows) in L2. With the chunks in axis 1 a head walks every chunk before the next head starts,
# and once a batch's CB matrices crowd L2 (256 KiB per chunk and group at chunk 256: 32 MiB for
# 8 x 4096 tokens) the next head reads them from memory again: 9% of the chunk scan's time at
# that shape on an H200, 1-2% where they are 16 MiB (bench/NOTES_kernels.md Run 12). A benchmark
# flag (heads_fast=False) keeps the other order for the A/B.
def head_chunk_grid(tiles: int, nheads: int, nchunks_total: int, heads_fast: bool) -> tuple[int, int, int]:
    """The 3-D grid (tiles per (chunk, head), then heads and batch * nchunks in the order chosen)."""
    return (tiles, nheads, nchunks_total) if heads_fast else (tiles, nchunks_total, nheads)


@triton.jit
def head_chunk_pids(HEADS_FAST: tl.constexpr):
    """(pid_bc, pid_h) as int64 for a grid made by head_chunk_grid with the same order."""
    if HEADS_FAST:
        pid_h = tl.program_id(1).to(tl.int64)
        pid_bc = tl.program_id(2).to(tl.int64)
    else:
        pid_bc = tl.program_id(1).to(tl.int64)
        pid_h = tl.program_id(2).to(tl.int64)
    return pid_bc, pid_h


def autotune_per_chunk(kernel, configs, key, chunk_params, state_params=()):
    """`autotune(configs, key)(kernel)` per chunk size: call the result with the chunk size to get the
    launcher. The block sizes named in `chunk_params` tile a chunk's positions and must not exceed the
    chunk size (a tile would run into the next chunk and write its rows: wrong results, silently), so
    they are clamped to it, duplicate configs dropped. Triton's own pruning is not used because it is
    skipped when a single config is left (the interpreter, KERNELS_AUTOTUNE=0). Those named in
    `state_params` tile dstate: called with `state_block` (dstate's power of two), they are clamped
    to it, so a small state is not computed in a tile of mostly masked lanes."""
    launchers = {}

    def clamp(cfg, chunk_size, state_block):
        kw = {k: (min(v, chunk_size) if k in chunk_params else
                  min(v, state_block) if k in state_params and state_block else v)
              for k, v in cfg.kwargs.items()}
        return triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)

    def for_chunk(chunk_size: int, state_block: int | None = None):
        if (chunk_size, state_block) not in launchers:
            clamped, seen = [], set()
            for cfg in configs:
                c = clamp(cfg, chunk_size, state_block)
                sig = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, c.maxnreg)
                if sig not in seen:
                    seen.add(sig)
                    clamped.append(c)
            launchers[chunk_size, state_block] = autotune(clamped, key=key)(kernel)
        return launchers[chunk_size, state_block]

    # the i-th config of the list as for_chunk clamps it, and a launcher like for_chunk's that runs it
    # alone, with no tuning (benchmarks time every config, tests check each)
    for_chunk.config = lambda i, chunk_size, state_block=None: clamp(configs[i], chunk_size, state_block)
    for_chunk.with_config = lambda i, chunk_size, state_block=None: _OneConfig(
        kernel, for_chunk.config(i, chunk_size, state_block))
    for_chunk.num_configs = len(configs)
    return for_chunk


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are
# constexpr_functions: ~4 us per call from host code (argument unwrapping), and one SSD
# forward+backward made ~40 such calls.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (exact like the reference); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
