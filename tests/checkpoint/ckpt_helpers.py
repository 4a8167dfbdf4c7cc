"""Shared pieces of the checkpoint tests: a small prepared dataset and a tiny model config."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO / "scripts"))
from crash_harness import TINY_MODEL, write_corpus  # noqa: E402  (the tiny hybrid with a biased router, byte vocabulary)


def prepare_dataset(tmp: Path, seq_len: int = 32) -> Path:
    from data.prepare import prepare

    out = tmp / "data"
    if not (out / "index.json").is_file():
        prepare([str(write_corpus(tmp / "corpus", num_docs=300))], "bytes", out, seq_len, progress=False)
    return out


def tiny_overrides(run_dir: Path, data: Path, name: str = "run", steps: int = 12, *extra: str) -> list[str]:
    return [
        *TINY_MODEL, f"data.path={data}", "data.seq_len=32", "data.micro_batch_size=4", "data.global_batch_size=4",
        "optim.lr=3e-3", "optim.warmup_steps=2", f"trainer.max_steps={steps}", "trainer.log_interval=1",
        "trainer.device=cpu", "kernels.backend=torch", f"run.dir={run_dir}", f"run.name={name}", *extra,
    ]


def read_losses(run_dir: Path, name: str = "run") -> dict[int, float]:
    """step -> loss from metrics.jsonl; fails on a step logged twice."""
    out: dict[int, float] = {}
    for line in (run_dir / name / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["step"] not in out, f"step {rec['step']} logged twice in metrics.jsonl"
        out[rec["step"]] = rec["loss"]
    return out


def subprocess_env(tmpdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(TMPDIR=str(tmpdir), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


PYTHON = sys.executable


class Ranks(list):
    """The rank processes of one launch, and the TCPStore they rendezvous at (alive as long as this list)."""

    def __init__(self, procs: list, store) -> None:
        super().__init__(procs)
        self.store = store


def launch_ranks(nproc: int, args: list[str], tmpdir: Path, log_dir: Path, tag: str) -> Ranks:
    """`python -m pretrain.train ARGS` as `nproc` gloo ranks (RANK/WORLD_SIZE env, as torchrun sets);
    each rank's output goes to log_dir/<tag>_rank<r>.log.

    The rendezvous store is served here, on a port the OS picks as it binds (as torchrun's agent does:
    TORCHELASTIC_USE_AGENT_STORE makes every rank a client), not on a port found free beforehand, which
    another test worker's process could take before rank 0 binds it."""
    import subprocess

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        env = subprocess_env(tmpdir)
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                   HP_DIST_TIMEOUT_MIN="5")
        with open(log_dir / f"{tag}_rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen([PYTHON, "-m", "pretrain.train", *args], cwd=REPO, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return Ranks(procs, store)


def wait_all(procs: list, timeout: float = 600) -> list[int]:
    import time

    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:  # each rank is its own process group: nothing it started outlives the test
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def model_tensors(ckpt: Path) -> dict:
    """Every tensor of a dist_checkpointing checkpoint (model and optimizer), by key."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f".{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, map_location="cpu", weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
