"""The weight-gradient GEMM with gradient accumulation, fused or not, at a preset's linear shapes; one table.

    python bench/wgrad.py configs/hybrid_1b3.yaml[:key=value,...] [--iters 50]

Per Linear shape of the preset's Mamba, attention and MLP layers (out, in), over the micro-batch's
rows (micro_batch_size x seq_len), the median time (CUDA events) of:
- `bf16 mm`: grad_out^T @ input with a bf16 output, the GEMM alone (what no accumulation would cost);
- `plain`: what autograd does under bf16 autocast over float32 weights: that GEMM, the cast of its
  output to float32, and AccumulateGrad's add into `.grad`;
- `fused`: pretrain/layers/linear.py's accumulate_wgrad_ (trainer.gradient_accumulation_fusion):
  one GEMM with a float32 output and beta = 1 into the sum;
- `mm fp32 out`: the GEMM with a float32 output and no addend (torch.mm out_dtype), to separate
  the cost of the float32 output from that of the addend.
Then the sum over all the preset's layers per micro-batch (each shape times its count).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.presets import linear_shapes  # noqa: E402
from pretrain.layers.linear import accumulate_wgrad_  # noqa: E402


def weight_shapes(spec: str) -> tuple[dict[tuple[int, int], int], int]:
    """({(out, in): how many of the preset's fused Linear layers have a weight of that shape, whatever
    their names}, rows per micro-batch): bench/presets.linear_shapes without the LM head."""
    rows, named = linear_shapes(spec, with_head=False)
    counts: Counter = Counter()
    for (_, in_f, out_f), count in named.items():
        counts[(out_f, in_f)] += count
    return dict(counts), rows


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    shapes, rows = weight_shapes(args.config)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {rows} rows; "
          f"ms per call (median of {args.iters})\n")
    print("| out x in | layers | bf16 mm | plain (mm + cast + add) | fused | mm fp32 out | fused TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    total = {"mm": 0.0, "plain": 0.0, "fused": 0.0, "mm32": 0.0}
    for (out_f, in_f), count in sorted(shapes.items()):
        dy = torch.randn(rows, out_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(out_f, in_f, device="cuda")

        def plain():
            acc.add_(torch.mm(dy.t(), x).float())

        t = {"mm": time_ms(lambda: torch.mm(dy.t(), x), args.iters), "plain": time_ms(plain, args.iters),
             "fused": time_ms(lambda: accumulate_wgrad_(acc, dy, x), args.iters),
             "mm32": time_ms(lambda: torch.mm(dy.t(), x, out_dtype=torch.float32), args.iters)}
        for key in total:
            total[key] += t[key] * count
        tflops = 2 * rows * out_f * in_f / t["fused"] / 1e9
        print(f"| {out_f} x {in_f} | {count} | {t['mm']:.3f} | {t['plain']:.3f} | {t['fused']:.3f} | "
              f"{t['mm32']:.3f} | {tflops:.0f} |")
    print(f"| all layers, ms per micro-batch | | {total['mm']:.2f} | {total['plain']:.2f} | {total['fused']:.2f} | "
          f"{total['mm32']:.2f} | |")


if __name__ == "__main__":
    main()
