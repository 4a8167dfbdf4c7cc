"""Run metrics: metrics.jsonl + TensorBoard, and the rank-0 progress line.

Only the process that owns the writer (rank 0) writes; the progress line shows step/total (%),
loss, lr, grad norm, tokens/s (total and per GPU), TFLOP/s per GPU, MFU, memory, step time, ETA.
"""
from __future__ import annotations

import json
import os
import time

import torch


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)
    except ImportError:  # pragma: no cover - non-POSIX
        return None


def progress_line(r: dict, total_steps: int) -> str:
    parts = [
        f"step {r['step']}/{total_steps} ({100.0 * r['step'] / total_steps:.1f}%)",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"gnorm {r['grad_norm']:.3f}",
        f"{human(r['tokens_per_s'])} tok/s ({human(r['tokens_per_s_per_gpu'])}/gpu)",
        f"{r['tflops_per_gpu']:.2f} TFLOP/s/gpu",
        f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "MFU n/a",
    ]
    if r.get("memory_gb") is not None:
        parts.append(f"mem {r['memory_gb']:.2f} GB")
    parts += [f"{r['step_time_s']:.3f} s/step", f"ETA {duration(r['eta_s'])}"]
    return " | ".join(parts)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and value is not None:
                self._tb.add_scalar(key, value, step)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):
                    self._tb.add_scalar(f"{key}/{i}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
