"""What FP8 linears would save in one micro-batch of a preset, measured GEMM by GEMM; one table.

    python bench/fp8_gemm.py configs/hybrid_460m.yaml [configs/hybrid_1b3.yaml ...]

Not a training path: the decision, with numbers, whether FP8 (e4m3 forward, e5m2 output gradient,
tensorwise scales from the current amax, as torchao's float8 "tensorwise" recipe) is worth building
for a preset. For every distinct nn.Linear shape of the preset's model (built on the meta device:
no memory), at the preset's tokens per micro-batch (M = micro_batch_size x seq_len), on CUDA:
- bf16: the forward GEMM x (M, K) @ w (N, K)^T and the input-gradient GEMM dy (M, N) @ w;
- fp8: the same two through torch._scaled_mm (the forward with fast accumulation, the input
  gradient without), plus the casts FP8 adds per micro-batch: the amax and cast of x (e4m3) and of
  dy (e5m2), each torch.compile'd into the fewest kernels Inductor makes of it (here they cannot
  fuse into the kernel that produced x or dy: our norms and mixer cores are custom ops). The
  weights' casts (once per optimizer step with gradient accumulation) are a column of their own.
The weight-gradient GEMM stays bf16 in this recipe and is not timed; routed MoE experts (grouped
GEMMs over their routed tokens) are left out. Median ms over CUDA events
(bench/kernels.py's `bench`: triton's do_bench, L2 flushed). "saved" = count x (bf16 - fp8 - casts):
negative where the casts eat the faster GEMM.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.presets import linear_shapes  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t (any shape) -> (t * scale in the fp8 dtype, 1 / scale as a float32 scalar), with scale =
    the dtype's largest finite value / amax(|t|): tensorwise current scaling. All-zero t: scale 1."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float()
    scale = torch.where(amax > 0, top / amax, torch.ones_like(amax))
    q = (t.float() * scale).clamp(-top, top).to(dtype)
    return q, scale.reciprocal()


def fp8_linear_gemms(x8, x_inv, w8, w8_t, w_inv, dy8, dy_inv, out_dtype=torch.bfloat16):
    """The two FP8 GEMMs of a linear: (x8 (M, K) e4m3, w8 (N, K) e4m3, w8_t (K, N) e4m3 contiguous,
    dy8 (M, N) e5m2, and their inverse scales) -> (y (M, N) = x @ w^T, dx (M, K) = dy @ w) in
    out_dtype. _scaled_mm takes its second operand column-major: w8.t() and w8_t.t() are."""
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype, use_fast_accum=True)
    dx = torch._scaled_mm(dy8, w8_t.t(), scale_a=dy_inv, scale_b=w_inv, out_dtype=out_dtype)
    return y, dx


def weight_casts(w: torch.Tensor):
    """w (N, K) float32 -> (w8, w8_t, 1/scale): the weight in e4m3 both ways round (the once-per-step part)."""
    w8, inv = quantize(w, E4M3)
    return w8, w8.t().contiguous(), inv


def measure(m: int, k: int, n: int, bench) -> dict:
    """ms of the bf16 pair, the fp8 pair, the activation casts and the weight casts at one shape."""
    torch._dynamo.reset()  # the casts compile afresh at each shape (no recompile limit, no dynamic shapes)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    dy = torch.randn(m, n, device="cuda", generator=g).bfloat16() * 1e-3
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    wb = w.bfloat16()
    cast_x = torch.compile(lambda t: quantize(t, E4M3))
    cast_dy = torch.compile(lambda t: quantize(t, E5M2))
    cast_w = torch.compile(weight_casts)
    x8, x_inv = cast_x(x)
    dy8, dy_inv = cast_dy(dy)
    w8, w8_t, w_inv = cast_w(w)
    return {
        "bf16": bench(lambda: (F.linear(x, wb), dy @ wb)),
        "fp8": bench(lambda: fp8_linear_gemms(x8, x_inv, w8, w8_t, w_inv, dy8, dy_inv)),
        "casts": bench(lambda: (cast_x(x), cast_dy(dy))),
        "weight": bench(lambda: cast_w(w)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config.yaml[:key=value,...]")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("bench/fp8_gemm.py needs a CUDA GPU with FP8 tensor cores (sm_89 or newer)")
    from bench.kernels import bench

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; per micro-batch, ms (median, CUDA events)")
    for spec in args.configs:
        m, shapes = linear_shapes(spec)
        print(f"\n{spec}: M = {m} tokens")
        print(f"{'layer':<10} {'K':>6} {'N':>6} {'x':>3} | {'bf16 fwd+dgrad':>14} {'fp8 fwd+dgrad':>13} "
              f"{'casts':>6} {'speedup':>7} | {'weight casts':>12} | {'saved x count':>13}")
        totals = Counter()
        for (name, k, n), count in sorted(shapes.items(), key=lambda kv: -kv[0][1] * kv[0][2] * kv[1]):
            r = measure(m, k, n, bench)
            saved = count * (r["bf16"] - r["fp8"] - r["casts"])
            totals.update({"bf16": count * r["bf16"], "fp8": count * (r["fp8"] + r["casts"]),
                           "weight": count * r["weight"], "saved": saved})
            print(f"{name:<10} {k:>6} {n:>6} {count:>3} | {r['bf16']:>14.3f} {r['fp8']:>13.3f} {r['casts']:>6.3f} "
                  f"{r['bf16'] / (r['fp8'] + r['casts']):>6.2f}x | {r['weight']:>12.3f} | {saved:>13.2f}")
        print(f"{'total':<10} {'':>6} {'':>6} {'':>3} | {totals['bf16']:>14.2f} {totals['fp8']:>20.2f} "
              f"{totals['bf16'] / totals['fp8']:>6.2f}x | {totals['weight']:>12.2f} | {totals['saved']:>13.2f}")


if __name__ == "__main__":
    main()
