"""Data loader throughput (tokens/s per rank) against what training consumes; prints one table.

    python bench/data.py --seq-len 4096 --micro-batch-size 8 --samples 2048 --workers 0,2,4

Reads a synthetic packed dataset (data/synthetic.py: the prepared format, random tokens) through the
training loader (data.dataset.build_train_loader: StreamingDataset, shuffling, seq_idx) for one epoch
per row, with each --workers count, from
  local         the shards on local disk
  remote-cold   s3:// on a local S3 server (moto, 127.0.0.1), through an empty cache directory
  remote-warm   the same remote stream again, every shard already in the cache
(remote rows need moto[server], from the dev extra; --no-remote skips them). Columns: seconds from
building the loader to the first batch, then steady tokens/s and batches/s over the rest of the epoch
(one process = one rank; with dp ranks on a node each has its own loader and workers). The footer
sets that against the per-GPU consumption measured in bench/NOTES_train.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "data"))  # s3_server.py: the moto server of the data tests

from data.dataset import build_train_loader  # noqa: E402
from data.synthetic import write_synthetic  # noqa: E402

# tokens/s per GPU the trainer consumed on one H100 (bench/NOTES_train.md, run 1, triton backend)
TRAINING = {"hybrid_460m 8x4096": 90.0e3, "hybrid_1b3 4x4096": 41.1e3, "debug_gpu 16x1024 (torch)": 170.7e3}


def measure(seq_len: int, micro_batch_size: int, workers: int, **source) -> tuple[float, float, float]:
    """(seconds to the first batch, tokens/s and batches/s after it) over one epoch."""
    start = time.perf_counter()
    loader = build_train_loader(seq_len=seq_len, micro_batch_size=micro_batch_size, seed=0,
                                num_workers=workers, pin_memory=False, **source)
    it = iter(loader)
    next(it)
    first = time.perf_counter()
    batches = 0
    for batch in it:
        batches += 1
        assert batch["tokens"].shape == (micro_batch_size, seq_len)
    seconds = time.perf_counter() - first
    del it, loader
    return first - start, batches * micro_batch_size * seq_len / seconds, batches / seconds


def upload(local: Path, remote: str) -> None:
    from streaming.base.storage import CloudUploader

    uploader = CloudUploader.get((str(local), remote), keep_local=True, exist_ok=True)
    for f in sorted(local.iterdir()):
        uploader.upload_file(f.name)


def human(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=2048, help="samples in the synthetic dataset (one epoch)")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--shard-size-limit", default="4mb")
    p.add_argument("--workers", default="0,2,4", help="comma-separated num_workers values")
    p.add_argument("--no-remote", action="store_true", help="skip the remote (moto S3) rows")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    own_tmp = None
    if "TMPDIR" not in os.environ:  # streaming's filelocks: a private TMPDIR, removed at the end
        own_tmp = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="bench-data-tmp-")
        tempfile.tempdir = own_tmp
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    rows = []
    try:
        local = write_synthetic(work / "local", seq_len=args.seq_len, vocab_size=args.vocab_size,
                                num_samples=args.samples, shard_size_limit=args.shard_size_limit)
        num_shards = sum(1 for f in local.iterdir() if f.suffix == ".mds")
        for w in workers:
            rows.append(("local", w, *measure(args.seq_len, args.micro_batch_size, w, path=local)))
        if not args.no_remote:
            try:
                from s3_server import local_s3
            except ImportError as err:
                print(f"remote rows skipped: {err} (pip install 'moto[server]')")
            else:
                with local_s3("bench"):
                    upload(local, "s3://bench/data")
                    for w in workers:
                        cache = work / f"cache{w}"
                        stream = [{"remote": "s3://bench/data", "local": str(cache)}]
                        rows.append(("remote-cold", w, *measure(args.seq_len, args.micro_batch_size, w, streams=stream)))
                        rows.append(("remote-warm", w, *measure(args.seq_len, args.micro_batch_size, w, streams=stream)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)

    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f}; dataset {args.samples} samples x {args.seq_len + 1} tokens, "
          f"{num_shards} shards; micro-batch {args.micro_batch_size}")
    print("| source | workers | first batch s | tokens/s per rank | batches/s |")
    print("|---|---|---|---|---|")
    for source, w, first, tps, bps in rows:
        print(f"| {source} | {w} | {first:.2f} | {human(tps)} | {bps:.1f} |")
    slowest = min(r[3] for r in rows)
    print("\ntraining consumes per GPU (bench/NOTES_train.md, H100): "
          + ", ".join(f"{k}: {human(v)} tok/s" for k, v in TRAINING.items()))
    print(f"slowest loader row: {human(slowest)} tok/s = {slowest / max(TRAINING.values()):.0f}x the most "
          f"hungry of these")


if __name__ == "__main__":
    main()
