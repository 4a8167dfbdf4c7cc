"""End-to-end training throughput on one GPU through the trainer users run; prints one table.

    python bench/train.py configs/hybrid_460m.yaml configs/hybrid_1b3.yaml:data.micro_batch_size=4 \
        --steps 10 --warmup 3 --backends triton,torch

Each row builds the real `pretrain.trainer.Trainer` (engine, optimizer, streaming loader) on a
synthetic packed dataset of the preset's vocabulary and sequence length, runs `--warmup` steps,
then times `--steps` steps with CUDA events. Every row runs in a fresh process (nothing of an
earlier row stays in its memory figures). Columns: tokens/s, TFLOP/s per GPU and MFU (the
trainer's own formula, pretrain/flops.py: 3 x forward FLOPs of every matmul incl. the attention and
SSD terms, over the device's bf16 dense peak), peak memory, the memory resident between steps
(parameters, optimizer state, kept gradient buffers: peak minus it is what a step adds), and the
split of a step into data,
forward+backward and optimizer (synchronised per phase in a separate pass), plus forward alone,
and the memory one forward keeps per residual block (saved activations + output, by block kind).
The comparison in the same run is the same preset with `kernels.backend=torch` (the PyTorch
reference kernels); a row that runs out of memory says OOM.

A step is one micro-batch and one optimizer step by default. `--accum N` makes a step N
micro-batches of gradient accumulation and one optimizer step, as the presets' global batches do
on one GPU (hybrid_460m: 256 / 8 = 32); "step ms" is then the whole step, the data, fwd and fwd+bwd
columns stay per micro-batch.

`--profile N` also runs N steps under torch.profiler per row and prints the GPU kernels with the
most time, the launches per step and the kernel time by category (GEMMs, SSD kernels, Inductor's
elementwise kernels, ...: where the remaining time goes).

`--device cpu` runs the same rows on the CPU (float32, no memory figures): a smoke test of this
script for CI (tests/pretrain/test_bench_train.py), not a measurement.

The LM head + cross-entropy run in chunks of `trainer.loss_chunk_tokens` tokens (default null =
4096 on CUDA; pretrain/chunked_loss.py), which computes the head's gradients inside the forward:
the "fwd ms" column then includes them. To compare with materialised logits, or other chunks:
    python bench/train.py configs/hybrid_460m.yaml:trainer.loss_chunk_tokens=0 \
        configs/hybrid_460m.yaml:trainer.loss_chunk_tokens=8192 --backends triton
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import write_synthetic  # noqa: E402
from kernels._triton_utils import record_tuning, write_tuned_table  # noqa: E402
from pretrain.config import load_config, validate  # noqa: E402
from pretrain.distributed import DistInfo  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


def split_overrides(text: str) -> list[str]:
    """"a=1,b=x,y" -> ["a=1", "b=x,y"]: overrides are separated by commas, and a piece without "=" continues
    the previous value (comma-separated values such as trainer.recompute=mamba,moe)."""
    out: list[str] = []
    for piece in (p for p in text.split(",") if p):
        if "=" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def build_trainer(spec: str, backend: str, steps: int, workdir: Path, accum: int, device: torch.device) -> Trainer:
    path, _, extra = spec.partition(":")
    overrides = split_overrides(extra)
    cfg = load_config([path], overrides)
    num = max(64, cfg.data.micro_batch_size * accum * (steps + 4))  # every sample a row reads, 4 steps spare
    data_dir = workdir / f"data_{cfg.data.seq_len}_{cfg.model.vocab_size}_{num}"
    if not data_dir.exists():
        write_synthetic(data_dir, seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size, num_samples=num)
    cfg = load_config([path], overrides + [
        f"data.path={data_dir}", "data.demo_corpus=false", f"kernels.backend={backend}",
        f"run.dir={workdir / 'runs'}", f"run.name=bench_{Path(path).stem}_{backend}",
        f"trainer.max_steps={steps}", "trainer.max_tokens=0", "checkpoint.interval=0",
        f"data.global_batch_size={cfg.data.micro_batch_size * accum}",
    ])
    derived = validate(cfg, 1)
    return Trainer(cfg, derived, DistInfo(rank=0, world_size=1, local_rank=0, device=device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per step over `steps` unsynchronised steps (CUDA events at both ends; the wall
    clock on the CPU)."""
    cuda = trainer.device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if not cuda:
        return (time.perf_counter() - t0) / steps
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def training_forward(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A training micro-batch's forward alone (graph kept, no backward): the loss. With the engine's
    gradient accumulation fusion its buffers are attached as in forward_backward, so the compiled
    blocks run the graphs training runs (the caller drops them with engine.zero_grad())."""
    if engine.fused_linears is not None:
        engine.fused_linears.attach(engine.amp_dtype)
    with engine.autocast():
        return engine.model.loss(batch["tokens"], batch["labels"], batch["seq_idx"], 0.0)[0]


def phase_split(trainer: Trainer, steps: int) -> dict[str, float]:
    """Median seconds of each phase, synchronising between phases."""
    phases: dict[str, list[float]] = {"data": [], "fwd+bwd": [], "optimizer": [], "forward": []}
    engine, dev = trainer.engine, trainer.device
    for _ in range(steps):
        synchronize(dev)
        t0 = time.perf_counter()
        batch = trainer.next_batch()
        synchronize(dev)
        t1 = time.perf_counter()
        engine.forward_backward(batch, 1.0)
        synchronize(dev)
        t2 = time.perf_counter()
        engine.step(trainer.cfg.optim.lr * 0.01)
        synchronize(dev)
        t3 = time.perf_counter()
        loss = training_forward(engine, batch)
        synchronize(dev)
        t4 = time.perf_counter()
        del loss
        engine.zero_grad()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key].append(value)
    return {k: statistics.median(v) for k, v in phases.items()}


def block_activation_mb(trainer: Trainer) -> dict[str, float]:
    """Memory kept by one forward pass (graph alive) per residual block, mean MB by block kind: the
    allocator's bytes after a block's forward minus before it (its saved activations plus its
    (batch, seqlen, d_model) output), read on the host at enqueue time, no sync needed."""
    engine = trainer.engine
    if trainer.device.type != "cuda":
        return {}
    layers = getattr(engine.model, "layers", [])
    sizes: dict[str, list[float]] = {}
    before: list[int] = []
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, a: before.append(torch.cuda.memory_allocated())))
        hooks.append(layer.register_forward_hook(lambda m, a, o: sizes.setdefault(m.kind, []).append(
            (torch.cuda.memory_allocated() - before.pop()) / 2**20)))
    try:
        loss = training_forward(engine, trainer.next_batch())
        del loss
        engine.zero_grad()
    finally:
        for hook in hooks:
            hook.remove()
    return {kind: statistics.mean(v) for kind, v in sizes.items()}


# kernel name pattern (re.search) -> category of bench/train.py's profile summary, first match wins.
# Inductor's kernels (named triton_<kind>_fused_<ops>) first: their op lists contain our kernels'
# fragments (triton_per_fused__fused_rms_norm_... is torch's RMSNorm compiled, not
# kernels/rmsnorm_gated); then flash attention, whose template arguments name cutlass types
KERNEL_CATEGORIES = tuple((category, re.compile(pattern)) for category, pattern in (
    ("Inductor (compiled elementwise)", r"^triton_"),
    ("attention (flash)", r"flash"),
    ("GEMM (cuBLAS)", r"nvjet|gemm|cutlass|sm90_xmma"),
    ("SSD (Triton)", r"_chunk_|_state_pass|_dt_|_cb_kernel"),
    ("norm, conv, loss (Triton)", r"_rms_|_conv_|_ce_rows"),
    ("optimizer (multi-tensor)", r"multi_tensor_apply"),
))
OTHER_CATEGORY = "other (aten elementwise, reductions, copies, memsets)"


def kernel_category(name: str) -> str:
    """The summary category of a GPU kernel name (KERNEL_CATEGORIES), OTHER_CATEGORY when none matches."""
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), OTHER_CATEGORY)


def print_kernel_rows(title: str, events, steps: int) -> None:
    """A markdown table of profiler events: name (cut at 110 characters), ms and calls per step."""
    print(f"| {title} | ms/step | calls/step |\n|---|---|---|")
    for e in events:
        print(f"| {e.key[:110]} | {e.self_device_time_total / 1e3 / steps:.2f} | {e.count // steps} |")


def print_profile(trainer: Trainer, steps: int, top: int = 60) -> None:
    """torch.profiler over `steps` training steps: the GPU kernels with the most total time, the time
    by kernel category, and the step's wall time against the kernels' (host-bound gaps). User
    annotations (the optimizer's step range) span kernels and are not counted."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    print(f"\nprofile: {wall_ms:.0f} ms per step (profiled), GPU kernels {busy_ms:.0f} ms, "
          f"{len(kernels)} kernel kinds, {sum(e.count for e in kernels) // steps} launches per step")
    print_kernel_rows("kernel", kernels[:top], steps)
    categories = [kernel_category(e.key) for e in kernels]
    by_category: dict[str, float] = {}
    for e, category in zip(kernels, categories):
        by_category[category] = by_category.get(category, 0.0) + e.self_device_time_total / 1e3 / steps
    print("\n| kernel category | ms/step | share of kernel time |\n|---|---|---|")
    for category, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {category} | {ms:.2f} | {ms / busy_ms:.1%} |")
    others = [e for e, category in zip(kernels, categories) if category == OTHER_CATEGORY]
    print()
    print_kernel_rows('uncategorised kernel (the "other" row)', others[:20], steps)


def run_row(spec: str, backend: str, args, workdir: Path) -> dict:
    row = {"config": spec.split(":")[0].split("/")[-1].removesuffix(".yaml"), "backend": backend,
           "overrides": spec.partition(":")[2]}
    trainer = None
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = build_trainer(spec, backend, args.warmup + args.steps + args.split_steps + args.profile, workdir,
                                args.accum, device)
        for _ in range(args.warmup):
            trainer.train_step()
        step_s = timed_steps(trainer, args.steps)
        split = phase_split(trainer, args.split_steps)
        # between steps (no graph alive): parameters, optimizer state, gradient buffers the engine keeps
        resident_gb = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
        act_mb = block_activation_mb(trainer)
        if args.profile:
            print_profile(trainer, args.profile)
        tokens = trainer.derived.tokens_per_step
        tflops = trainer.flops_per_token * tokens / step_s / 1e12
        row.update(
            batch=f"{trainer.cfg.data.micro_batch_size}x{trainer.cfg.data.seq_len}"
                  + (f" x{args.accum}" if args.accum > 1 else ""),
            params=f"{trainer.params['total'] / 1e6:.0f}M/{trainer.params['active'] / 1e6:.0f}M",
            tok_s=tokens / step_s, tflops=tflops,
            mfu=tflops / trainer.peak_tflops if trainer.peak_tflops else float("nan"),
            mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), resident_gb=resident_gb,
            step_ms=step_s * 1e3,
            **{f"{k}_ms": v * 1e3 for k, v in split.items()},
            act_mb=act_mb,
        )
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as err:  # a broken row must not hide the others
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    finally:
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict]) -> None:
    head = ["config", "backend", "batch", "params(tot/act)", "tok/s", "TFLOP/s", "MFU", "peak GB", "resident GB", "step ms",
            "data ms", "fwd ms", "fwd+bwd ms", "optim ms", "kept MB per block"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        name = r["config"] + (f" ({r['overrides']})" if r["overrides"] else "")
        if "error" in r:
            print(f"| {name} | {r['backend']} | " + r["error"] + " |" * (len(head) - 2))
            continue
        print(f"| {name} | {r['backend']} | {r['batch']} | {r['params']} | {r['tok_s'] / 1e3:.1f}K | "
              f"{r['tflops']:.1f} | {100 * r['mfu']:.1f}% | {r['mem_gb']:.1f} | {r['resident_gb']:.1f} | {r['step_ms']:.0f} | "
              f"{r['data_ms']:.1f} | {r['forward_ms']:.0f} | {r['fwd+bwd_ms']:.0f} | {r['optimizer_ms']:.0f} | "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.get("act_mb", {}).items())) + " |")


def row_in_fresh_process(spec: str, backend: str, args, workdir: Path) -> dict:
    """One row in its own Python process, so that no memory, cache or allocator state of an earlier
    row (measured: ~15 GB left by a jamba_like row) shows in this row's peak memory or speed."""
    cmd = [sys.executable, __file__, spec, "--backends", backend, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--split-steps", str(args.split_steps), "--profile", str(args.profile),
           "--accum", str(args.accum), "--device", args.device,
           "--one-row", str(workdir)] + (["--write-tuned", args.write_tuned] if args.write_tuned else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith(ROW_PREFIX)), flush=True)
    rows = [json.loads(line[len(ROW_PREFIX):]) for line in lines if line.startswith(ROW_PREFIX)]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:80]
        return {"config": spec.split(":")[0].split("/")[-1].removesuffix(".yaml"), "backend": backend,
                "overrides": spec.partition(":")[2], "error": f"exit {proc.returncode}: {tail}"}
    return rows[0]


ROW_PREFIX = "ROW "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="config.yaml[:key=value,key=value]")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--split-steps", type=int, default=3)
    parser.add_argument("--backends", default="triton,torch")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps per row and print the top GPU kernels")
    parser.add_argument("--accum", type=int, default=1, metavar="N",
                        help="micro-batches per optimizer step (data.global_batch_size = micro x N; default 1)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke test of this script (float32, no memory figures), not a measurement")
    parser.add_argument("--write-tuned", metavar="JSON",
                        help="merge each row's autotuning choices into this table (kernels/tuned_configs.json "
                             "is the one the kernels read first)")
    parser.add_argument("--one-row", metavar="WORKDIR", help=argparse.SUPPRESS)  # internal: one row, as JSON
    args = parser.parse_args()
    for flag, value, least in (("--accum", args.accum, 1), ("--steps", args.steps, 1),
                               ("--split-steps", args.split_steps, 1), ("--warmup", args.warmup, 0),
                               ("--profile", args.profile, 0)):
        if value < least:  # the split's medians need a step (a row would end in "no median for empty data")
            parser.error(f"{flag} must be >= {least}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/train.py needs a CUDA GPU (--device cpu runs it as a smoke test)")
    logging.basicConfig(level=logging.WARNING)
    if args.one_row:
        if args.write_tuned:
            record_tuning()
        row = run_row(args.specs[0], args.backends, args, Path(args.one_row))
        if args.write_tuned:
            row["tuned_entries"] = write_tuned_table(args.write_tuned)
        print(ROW_PREFIX + json.dumps(row), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TMPDIR", tmp)  # the rows' processes inherit it
        for spec in args.specs:
            for backend in args.backends.split(","):
                rows.append(row_in_fresh_process(spec, backend, args, Path(tmp)))
                print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test, not a measurement)"
    print(f"\n{where}, torch {torch.__version__}; MFU against the bf16 dense peak\n")
    print_table(rows)


if __name__ == "__main__":
    main()
