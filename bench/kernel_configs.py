"""Launch-config sweeps of the SSD kernels for bench/kernels.py: `--order` (the chunk scan and dx in
both launch orders) and `--configs` (every config of the chunk scan, dx, the chunk states, dprev, dCB
and dB/dC), and the markdown table `--configs` prints. Timing and
inputs are bench/kernels.py's (`bench`, `ssd_inputs`); tests/kernels/test_bench_kernels.py runs
these on the CPU under the interpreter.
"""

from __future__ import annotations

import re

import torch

from bench.kernels import bench, equal_documents, ssd_inputs


def _swept_calls(batch, seqlen, h, p, g, n, q, documents, dev, dt_):
    """The chunk scan, dx, the chunk states, dprev (the chunk-states kernel in its backward mode),
    dCB and dB/dC as callables of (config, ...) on one set of inputs (bench/kernels.py's SSD
    inputs, their CB, states and a random dS; `documents` equal documents per row, or none)."""
    from kernels._triton_utils import dot_precision
    from kernels.ssd import triton_bwd as bwd
    from kernels.ssd import triton_bwd_dx as bwd_dx
    from kernels.ssd import triton_fwd as fwd
    from kernels.ssd import triton_states as states

    prec = dot_precision(dt_)
    x, dt, A, B, C, D, bias = ssd_inputs(batch, seqlen, h, p, g, n, dev, dt_)
    seq = equal_documents(batch, seqlen, documents, dev)
    dy = torch.randn_like(x)
    dtp, cs = fwd.dt_cumsum(dt, bias, A, q, True, (0.0, float("inf")))
    cb = fwd.compute_cb(C, B, seq, q, prec)
    prev, prev_lp, _ = states.states_and_pass(x, B, dtp, cs, seq, None, q, prec)
    dS = torch.randn_like(prev)

    def scan(config, heads_fast=True):
        return fwd.chunk_scan(cb, x, None, D, C, prev_lp, dtp, cs, seq, q, False, prec, config=config,
                              heads_fast=heads_fast)

    def dx(config, heads_fast=True):
        return bwd_dx.chunk_dx(x, dy, D, B, cb, dS, dtp, cs, seq, q, prec, config=config, heads_fast=heads_fast)

    def chunk_states(config):
        return states.chunk_outer(x, B, dtp, cs, seq, q, 0, prec, config=config)

    def dprev(config):
        return states.chunk_outer(dy, C, dtp, cs, seq, q, 1, prec, config=config)

    # dCB and dB/dC at the head split the training backward takes at this shape
    dS_lp = dS.to(dt_)
    nsplit = bwd.head_split(x, dy, B, C, prev, dS_lp, dtp, cs, seq, cb, q, prec)
    dcb_out = bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, nsplit=nsplit)[0]

    def dcb(config):
        return bwd.chunk_dcb(x, dy, dtp, cs, seq, cb, g, q, prec, nsplit=nsplit, config=config)

    def dbc(config):
        return bwd.chunk_dbc(x, dy, B, C, prev, dS_lp, dcb_out, dtp, cs, seq, q, prec, config=config)

    return scan, dx, chunk_states, dprev, dcb, dbc


def launch_order(batch, seqlen, h, p, g, n, q=256, dev="cuda", dt_=torch.bfloat16):
    """The chunk scan and dx kernels (the two that read a per-group float32 CB tile per (chunk,
    head)) launched heads-fast (the default: a chunk's heads run together and share the tile in L2)
    and chunks-fast (the order before), each with the tuned config and the fixed one (config 0).
    -> [(name, ms)]."""
    scan, dx = _swept_calls(batch, seqlen, h, p, g, n, q, 0, dev, dt_)[:2]
    rows = []
    for config in (None, 0):
        for order in (True, False):
            tag = f"{'tuned' if config is None else 'fixed'} {'heads-fast' if order else 'chunks-fast'}"
            rows.append((f"chunk scan {tag}", bench(lambda: scan(config, order))))
            rows.append((f"dx {tag}", bench(lambda: dx(config, order))))
    return rows


SWEPT = ("scan", "dx", "states", "dprev", "dcb", "dbc")  # what `--configs` times, in this order


def config_sweep(batch, seqlen, h, p, g, n, q=256, documents=0, dev="cuda", dt_=torch.bfloat16, only=SWEPT):
    """The chunk scan, dx, the chunk states, dprev, dCB and dB/dC at the autotuned schedule
    ("tuned", which autotunes the shape's key when the table lacks it, so `--write-tuned` records
    it) and at every config of their lists (the chunk scan and dx heads-fast; rN: a cap of N
    registers per thread). documents: that many equal documents per row (seq_idx), as training on
    packed data calls them (the key differs). only: which of SWEPT to time. -> [(name, ms)]; the
    interpreter runs its own tiles for every row."""
    from kernels.ssd import triton_bwd as bwd
    from kernels.ssd import triton_bwd_dx as bwd_dx
    from kernels.ssd import triton_fwd as fwd
    from kernels.ssd import triton_states as states

    scan, dx, chunk_states, dprev, dcb, dbc = _swept_calls(batch, seqlen, h, p, g, n, q, documents, dev, dt_)
    nstate = max(16, 1 << (n - 1).bit_length())

    def label(launcher, i):
        cfg = launcher.config(i, q, nstate)
        return (f"#{i} " + ",".join(f"{k.removeprefix('BLOCK_')}{int(v) if isinstance(v, bool) else v}"
                                    for k, v in cfg.kwargs.items())
                + f",w{cfg.num_warps},s{cfg.num_stages}" + (f",r{cfg.maxnreg}" if cfg.maxnreg else ""))

    rows = []
    for name, call, launcher in (("chunk scan", scan, fwd._chunk_scan_tuned), ("dx", dx, bwd_dx._chunk_dx_tuned),
                                 ("chunk states", chunk_states, states._chunk_outer_tuned),
                                 ("dprev", dprev, states._chunk_outer_tuned),
                                 ("dcb", dcb, bwd._chunk_dcb_tuned), ("dbc", dbc, bwd._chunk_dbc_tuned)):
        if name.split()[-1] not in only:
            continue
        for i in [None] + list(range(launcher.num_configs)):
            rows.append((f"{name} {'tuned' if i is None else label(launcher, i)}", bench(lambda: call(i))))
    return rows


def row_kernel(name: str) -> str:
    """The kernel a `--configs` row times: its name without the config it ran."""
    return re.sub(r" (tuned|#\d+ .*)$", "", name)


def config_table(times: dict[str, list[float]], columns: list[str]) -> str:
    """`--configs`' rows as one markdown table: a row per kernel and config, a column per shape (ms),
    the fastest config of each kernel at each shape in bold."""
    kernel = {name: row_kernel(name) for name in times}
    best = {}
    for name, row in times.items():
        for j, ms in enumerate(row):
            best[kernel[name], j] = min(best.get((kernel[name], j), ms), ms)
    lines = ["| kernel, config | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in times.items():
        cells = [f"**{ms:.3f}**" if ms == best[kernel[name], j] else f"{ms:.3f}" for j, ms in enumerate(row)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
