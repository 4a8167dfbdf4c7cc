"""Loss of the fast path against the reference path over N steps, with bf16's own noise as the yardstick.

    python bench/loss_parity.py configs/hybrid_460m.yaml:data.micro_batch_size=2,trainer.recompute=full --steps 50

(micro batch 2 with recompute: the PyTorch reference SSD does not fit 4 x 4096 of hybrid_460m in 80 GB.)

Trains the preset three times from the same seed on the same real text (the offline demo corpus,
byte tokens, at the preset's sequence length) through the trainer users run:

- fast: `--fast` overrides (default kernels.backend=triton, trainer.compile=true), bf16 autocast;
- reference: `--reference` overrides (default kernels.backend=torch, trainer.compile=false,
  trainer.gradient_accumulation_fusion=false, trainer.residual_in_fp32=true: PyTorch kernels, eager,
  plain autograd, a float32 residual stream as mamba_ssm's blocks keep), bf16;
- yardstick: the reference in float32 (trainer.precision=fp32, CUDA only).

bf16 noise is what the reference itself moves when only its precision changes: |reference - yardstick|.
The fast path is within bf16 noise when its distance to the reference stays within that, step by step
(max over steps, and the mean over the last 10 steps); the verdict line prints both and PASS/FAIL with
`--factor` (default 2) of slack. The learning rate warms up over `--warmup-steps` (default 10) so the
loss actually moves in N steps. On a machine without CUDA it runs the first two rows in float32 (the
plumbing's check; tests/pretrain/test_loss_parity.py). `--deterministic` runs every row with
`trainer.deterministic=true`: bf16 GPU kernels are otherwise not bitwise reproducible (the same
reference gave 4.296 and 4.361 at one step on one machine: bench/NOTES_train.md Run 17), so a
verdict is a single draw; deterministic rows make it repeatable.

`--seeds 1234,7,...` repeats the three rows from each seed (`run.seed`; model init and data order)
and ends with a verdict over the seeds: the fast path's mean distance to the float32 yardstick (over
every step of every seed) against `--factor` times the reference's. A single trajectory's 2x rule
swings with rounding: the same code failed it at one seed and passed it at another, while the fast
path stayed as close to float32 as the reference in both (bench/NOTES_train.md Runs 17-20); each
path's distance to float32, averaged over seeds, is the steadier statistic. The per-seed verdicts
are printed too; the exit status is the verdict over the seeds when there are two or more.
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train import split_overrides  # noqa: E402
from pretrain.config import load_config, validate  # noqa: E402
from pretrain.distributed import DistInfo  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402

LAST = 10  # steps averaged at the end


def losses_of(spec: str, extra: list[str], steps: int, warmup_steps: int, workdir: Path, name: str) -> list[float]:
    """Per-step training losses of the preset `spec` (config.yaml[:overrides]) with `extra` overrides."""
    path, _, more = spec.partition(":")
    cfg = load_config([path], split_overrides(more))
    overrides = split_overrides(more) + [
        f"data.path={workdir / f'demo_{cfg.data.seq_len}'}", "data.demo_corpus=true", "data.tokenizer=bytes",
        f"data.global_batch_size={cfg.data.micro_batch_size}",
        f"run.dir={workdir / 'runs'}", f"run.name={name}", f"trainer.max_steps={steps}", "trainer.max_tokens=0",
        f"optim.warmup_steps={warmup_steps}", "checkpoint.interval=0", *extra]
    cfg = load_config([path], overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(cfg, validate(cfg, 1), DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    try:
        return [float(trainer.train_step()["loss"]) for _ in range(steps)]
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def compare(fast: list[float], ref: list[float], yard: list[float] | None, factor: float) -> tuple[str, bool]:
    """The verdict line: the fast path's distance to the reference against bf16's (reference vs float32)."""
    diff = [abs(a - b) for a, b in zip(fast, ref)]
    tail = slice(-min(LAST, len(fast)), None)
    tail_diff = abs(statistics.mean(fast[tail]) - statistics.mean(ref[tail]))
    text = f"fast vs reference: max |d| {max(diff):.4f}, last-{LAST} mean |d| {tail_diff:.4f}"
    if yard is None:
        return text + " (no float32 yardstick without CUDA)", True
    noise = [abs(a - b) for a, b in zip(ref, yard)]
    tail_noise = abs(statistics.mean(ref[tail]) - statistics.mean(yard[tail]))
    to_fp32 = [abs(a - b) for a, b in zip(fast, yard)]
    ok = max(diff) <= factor * max(noise) and tail_diff <= factor * max(tail_noise, 1e-3)
    return (text + f"; bf16 noise (reference vs float32): max |d| {max(noise):.4f}, last-{LAST} mean |d| "
            f"{tail_noise:.4f}; within {factor:g}x: {'PASS' if ok else 'FAIL'}\n"
            f"fast vs float32 reference: max |d| {max(to_fp32):.4f}, mean |d| {statistics.mean(to_fp32):.4f} "
            f"(reference vs float32: mean |d| {statistics.mean(noise):.4f})"), ok


def compare_seeds(runs: dict[int, dict[str, list[float]]], factor: float) -> tuple[str, bool]:
    """The verdict over seeds: runs maps each seed to its rows ("fast", "reference" and, with CUDA,
    "reference fp32"). Mean |fast - fp32| over every step of every seed against factor x the mean
    |reference - fp32|; without the yardstick, every seed's own verdict."""
    verdicts = {seed: compare(r["fast"], r["reference"], r.get("reference fp32"), factor)[1] for seed, r in runs.items()}
    text = (f"over seeds {', '.join(map(str, runs))}: the per-seed {factor:g}x rule passes in "
            f"{sum(verdicts.values())} of {len(runs)}")
    if any("reference fp32" not in r for r in runs.values()):
        ok = all(verdicts.values())
        return text + f" (no float32 yardstick without CUDA): {'PASS' if ok else 'FAIL'}", ok
    def to_fp32(path):  # mean |path - float32| over every step of every seed
        return statistics.mean(abs(a - b) for r in runs.values() for a, b in zip(r[path], r["reference fp32"]))

    fast, ref = to_fp32("fast"), to_fp32("reference")
    ok = fast <= factor * ref
    return (text + f"; fast vs float32 mean |d| {fast:.4f} against the reference's {ref:.4f} "
            f"(ratio {fast / max(ref, 1e-12):.2f}): within {factor:g}x: {'PASS' if ok else 'FAIL'}"), ok


def print_table(rows: dict[str, list[float]]) -> None:
    names = list(rows)
    steps = len(rows[names[0]])
    shown = sorted({1, 2, 5, *range(10, steps + 1, 10), steps} & set(range(1, steps + 1)))
    head = ["step", *names, "|fast - reference|"] + (["|reference - fp32|"] if "reference fp32" in rows else [])
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for s in shown:
        vals = [rows[n][s - 1] for n in names]
        cells = [f"{v:.4f}" for v in vals] + [f"{abs(vals[0] - vals[1]):.4f}"]
        if len(vals) > 2:
            cells.append(f"{abs(vals[1] - vals[2]):.4f}")
        print(f"| {s} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="config.yaml[:key=value,key=value]")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--fast", default="kernels.backend=triton,trainer.compile=true")
    parser.add_argument("--reference",
                        default="kernels.backend=torch,trainer.compile=false,trainer.gradient_accumulation_fusion=false,"
                                "trainer.residual_in_fp32=true")
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",") if x],
                        help="comma-separated run.seed values: the rows from each, and a verdict over them "
                             "(default: the config's seed, one verdict)")
    parser.add_argument("--deterministic", action="store_true",
                        help="every row with trainer.deterministic=true: each path gives the same bits run to run, "
                             "so the rows differ only by their code paths (torch's mode is process-wide: all rows "
                             "or none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    extra = ["trainer.deterministic=true"] if args.deterministic else []
    variants = {"fast": split_overrides(args.fast) + extra, "reference": split_overrides(args.reference) + extra}
    if cuda:
        variants["reference fp32"] = variants["reference"] + ["trainer.precision=fp32"]
    where = torch.cuda.get_device_name() if cuda else "CPU (float32)"
    runs = {}
    for seed in args.seeds or [None]:
        seeded = [f"run.seed={seed}"] if seed is not None else []
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, extra) in enumerate(variants.items()):
                rows[name] = losses_of(args.spec, extra + seeded, args.steps, args.warmup_steps, Path(tmp), f"parity{i}")
                print(f"{name}: {' '.join(f'{x:.4f}' for x in rows[name])}", flush=True)
        print(f"\n{args.spec}, {args.steps} steps, {where}, torch {torch.__version__}; fast = {args.fast}; "
              f"reference = {args.reference}{'; every row trainer.deterministic=true' if args.deterministic else ''}"
              f"{f'; run.seed={seed}' if seed is not None else ''}\n")
        print_table(rows)
        verdict, ok = compare(rows["fast"], rows["reference"], rows.get("reference fp32"), args.factor)
        print("\n" + verdict + "\n", flush=True)
        runs[seed] = rows
    if len(runs) > 1:
        verdict, ok = compare_seeds(runs, args.factor)
        print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
