"""What torch.compile makes of each residual block kind of a preset; prints one table.

    python bench/compile_graphs.py configs/hybrid_460m.yaml[:key=value,...] [--iters 20] [--device cuda]

Per block kind of the preset's pattern (mamba, attention, mlp, moe), one block built as the
single-process model builds it, with the preset's `trainer.recompute` parts, on the preset's
micro-batch (batch, seq_len, d_model) under bf16 autocast, with a seq_idx of one document per
row as the packed loader gives: dynamo's graph count and break count (`torch._dynamo.explain`)
and the first line of each distinct break reason, then the block's forward+backward time eager
and compiled (CUDA events around each iteration, the median of `--iters` after 3 warm-up ones).
A kind that is one graph with no break is wholly compiled around the Triton custom ops; each
break is a point where Inductor cannot fuse across and Python runs in between. (Attention's
deliberate host sync, `document_layout`, runs at the block's first statement, before the graph:
pretrain/layers/attention.py.)

`--device cpu` (float32, no autocast, wall-clock times; Triton kernels only under
TRITON_INTERPRET=1, else the PyTorch references): a smoke test of this script with small
overrides (tests/pretrain/test_bench_compile_graphs.py), not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from bench.presets import load_spec  # noqa: E402
from pretrain.model import ResidualBlock  # noqa: E402
from pretrain.recompute import parse_policy, set_parts  # noqa: E402


def block_for(kind: str, cfg, derived, device: torch.device) -> ResidualBlock:
    torch.manual_seed(0)
    block = ResidualBlock(kind, cfg.model, derived).to(device)
    # the preset's parts on this block's layers; whole-block recomputation (block kinds in
    # trainer.recompute) is the model's, not the block's, and not applied
    set_parts(block, parse_policy(cfg.trainer.recompute))
    return block


def fwd_bwd_ms(block, hidden, seq_idx, autocast, iters: int) -> float:
    cuda = hidden.device.type == "cuda"
    times = []
    for i in range(iters + 3):
        h = hidden.detach().requires_grad_(True)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with autocast():
            out = block(h, seq_idx)
        out.float().square().mean().backward()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= 3:
            times.append(elapsed)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="config.yaml[:key=value,key=value]")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or --device cpu for a smoke test")
    cfg, derived = load_spec(args.spec)
    kernels.set_backend(cfg.kernels.backend)
    device = torch.device(args.device)
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    batch, seqlen = cfg.data.micro_batch_size, cfg.data.seq_len
    hidden = torch.randn(batch, seqlen, cfg.model.d_model, device=device)
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    rows = []
    for kind in dict.fromkeys(derived.layer_kinds):
        block = block_for(kind, cfg, derived, device)
        torch._dynamo.reset()
        with autocast():
            explained = torch._dynamo.explain(block)(hidden.detach().requires_grad_(True), seq_idx)
        reasons = sorted({str(r.reason).strip().splitlines()[0][:100] for r in explained.break_reasons})
        eager = fwd_bwd_ms(block, hidden, seq_idx, autocast, args.iters)
        torch._dynamo.reset()
        compiled_block = block_for(kind, cfg, derived, device)
        compiled_block.compile()
        compiled = fwd_bwd_ms(compiled_block, hidden, seq_idx, autocast, args.iters)
        rows.append((kind, explained.graph_count, explained.graph_break_count, eager, compiled, reasons))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test, not a measurement)"
    print(f"\n{name}, torch {torch.__version__}; {args.spec}, {batch}x{seqlen}, "
          f"recompute={cfg.trainer.recompute}, backend={cfg.kernels.backend}\n")
    print("| block | graphs | breaks | eager fwd+bwd ms | compiled fwd+bwd ms | break reasons |")
    print("|---|---|---|---|---|---|")
    for kind, graphs, breaks, eager, compiled, reasons in rows:
        print(f"| {kind} | {graphs} | {breaks} | {eager:.2f} | {compiled:.2f} | {'; '.join(reasons) or '-'} |")


if __name__ == "__main__":
    main()
