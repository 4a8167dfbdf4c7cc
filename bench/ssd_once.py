"""One SSD forward+backward at a given shape, for a profiler: the call to profile runs inside
torch.cuda.profiler's start/stop, after warm-up calls that compile, autotune and fill the caches.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        python bench/ssd_once.py 2 8192 128 64 8 128 [--chunk 256] [--documents 4]

Positional: batch, seqlen, nheads, headdim, ngroups, dstate (bench/kernels.py's TARGETS order).
--documents K packs K equal documents per row (seq_idx), as training on packed data does.
Inputs are bench/kernels.py's (bf16 x, dt, B, C; D and dt_bias). Prints the wall time of the
profiled call only; the profiler names and measures its launches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

import kernels  # noqa: E402
from bench.kernels import ssd_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", type=int, nargs=6, metavar="N", help="batch seqlen nheads headdim ngroups dstate")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--documents", type=int, default=0, help="equal documents per row (seq_idx); 0: none")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    batch, seqlen, h, p, g, n = args.shape
    if args.documents and seqlen % args.documents:
        raise SystemExit(f"--documents {args.documents} must divide seqlen {seqlen}")
    torch.manual_seed(0)
    x, dt, A, B, C, D, bias = ssd_inputs(batch, seqlen, h, p, g, n, grad=True)
    seq_idx = None
    if args.documents:
        doc = torch.arange(seqlen, device="cuda", dtype=torch.int32) // (seqlen // args.documents)
        seq_idx = doc.expand(batch, seqlen).contiguous()
    gy = torch.randn_like(x)

    def step():
        for t in (x, dt, A, B, C, D, bias):
            t.grad = None  # no gradient accumulation kernels in the profile
        y = kernels.ssd_scan(x, dt, A, B, C, chunk_size=args.chunk, D=D, dt_bias=bias, seq_idx=seq_idx)
        y.backward(gy)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ssd fwd+bwd {tuple(args.shape)} chunk {args.chunk} documents {args.documents}: "
          f"{(time.perf_counter() - t0) * 1e3:.3f} ms (one call)")


if __name__ == "__main__":
    main()
