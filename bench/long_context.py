"""Long sequences on one GPU at cp=1: forward + backward of a small hybrid at up to 256K tokens.

    python bench/long_context.py [--config configs/debug_gpu.yaml] [--seqlens 65536,131072,262144]
                                 [--backends triton,torch] [--repeats 3]

Builds the single-process model of the preset (bf16 autocast over fp32 parameters, as the trainer
does), feeds one sequence of each length (one document: the attention layers take SDPA's causal
path, the SSD layers the chunked scan over the whole sequence), and times forward + backward with
CUDA events after one warm-up. Prints one table: per backend and length, the loss (finite or not),
the time, tokens/s and peak memory; a row that runs out of memory says OOM. The comparison in the same
run is `kernels.backend=torch` (the PyTorch reference kernels).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.backend  # noqa: E402
from pretrain.config import load_config, validate  # noqa: E402
from pretrain.model import HybridLM  # noqa: E402


def run_one(cfg, derived, backend: str, seqlen: int, repeats: int) -> dict:
    kernels.backend.set_backend(backend)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = HybridLM(cfg.model, derived, parallel=False).to(device)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seqlen + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, ce = model.loss(inputs, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(ce)

    try:
        step()  # warm-up (Triton compiles, autotune cache)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses = [step() for _ in range(repeats)]
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeats
        return {"loss": losses[-1], "finite": all(math.isfinite(v) for v in losses), "ms": ms,
                "tok_s": seqlen / ms * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/debug_gpu.yaml")
    ap.add_argument("--seqlens", default="65536,131072,262144")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/long_context.py needs a CUDA GPU")
    seqlens = [int(s) for s in args.seqlens.split(",")]
    rows = []
    for backend in args.backends.split(","):
        for seqlen in seqlens:
            cfg = load_config([args.config], [f"data.seq_len={seqlen}", "data.micro_batch_size=1",
                                              "data.global_batch_size=1"])
            derived = validate(cfg, 1)
            rows.append((backend, seqlen, run_one(cfg, derived, backend, seqlen, args.repeats)))
            print(f"done {backend} {seqlen}", file=sys.stderr, flush=True)
    cfg = load_config([args.config], [])
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.config}: pattern "
          f"{cfg.model.pattern}, d_model {cfg.model.d_model}, chunk {cfg.model.mamba.chunk_size}; batch 1, "
          f"bf16 autocast, forward+backward\n")
    print("| backend | seqlen | loss | finite | fwd+bwd ms | tok/s | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for backend, seqlen, r in rows:
        if r.get("oom"):
            print(f"| {backend} | {seqlen} | OOM | | | | |")
        else:
            print(f"| {backend} | {seqlen} | {r['loss']:.4f} | {r['finite']} | {r['ms']:.1f} | "
                  f"{r['tok_s'] / 1e3:.1f}K | {r['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
