"""Stand-in for ``python -m pretrain.train`` with the same Slurm-facing contract, used by the Slurm
tests until (and beside) the real trainer:

- ``--config FILE [--config FILE ...] [key=value ...]``; reads ``run.name``, ``run.dir`` (default
  ``runs``), ``trainer.max_steps`` and ``fake.*`` knobs (YAML file values, then the overrides).
- Distributed through torch's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gloo.
- SIGUSR1/SIGTERM set a flag; all ranks agree on it at the next step boundary, rank 0 writes a
  checkpoint (``checkpoints/latest`` atomically), every rank passes a barrier, then exits 42.
- On start it resumes after the step in ``checkpoints/latest``; rank 0 appends one line per step
  to ``metrics.jsonl`` (step, loss, restart, world size), so tests can check no step is lost or
  repeated.
"""

import signal

_SIGNALS: list[int] = []


def _on_signal(signum, frame):  # installed first thing, before the slow imports
    _SIGNALS.append(signum)


signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REQUEUE_EXIT_CODE = 42


def load_config(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"run": {"name": "fake", "dir": "runs"}, "trainer": {"max_steps": 10},
                            "fake": {"step_seconds": 0.2, "step_seconds_after_restart": None,
                                     "crash_at_step": 0}})
    for path in args.config:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    return OmegaConf.to_container(cfg)


def save(ckpt: Path, step: int) -> None:
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    tmp.write_text(str(step))
    os.replace(tmp, ckpt)  # atomic: a reader sees the old or the new step, never half of it


def main(argv: list[str]) -> int:
    cfg = load_config(argv)
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    node = os.environ.get("SLURMD_NODENAME", "local")
    if world > 1:
        dist.init_process_group("gloo")

    def all_max(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    run_dir = Path(cfg["run"]["dir"]) / cfg["run"]["name"]
    ckpt = run_dir / "checkpoints" / "latest"
    max_steps = int(cfg["trainer"]["max_steps"])
    step_seconds = float(cfg["fake"]["step_seconds"])
    if restart > 0 and cfg["fake"]["step_seconds_after_restart"] is not None:
        # lets a test make the first run outlast its time limit and the next one finish quickly
        step_seconds = float(cfg["fake"]["step_seconds_after_restart"])
    crash_at = int(cfg["fake"]["crash_at_step"])
    start = int(ckpt.read_text()) if ckpt.exists() else 0

    nodes = [None] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            # Steps after the checkpoint were logged by a run that stopped before saving them:
            # they are trained again, so drop them (the real trainer must do the same).
            keep = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            metrics.write_text("".join(line + "\n" for line in keep))
        print(f"[fake_trainer] world {world} on {nodes}, restart {restart}, resuming after step {start}"
              f" of {max_steps}", flush=True)
        with open(run_dir / "starts.jsonl", "a") as f:
            f.write(json.dumps({"restart": restart, "start": start, "world": world, "nodes": nodes}) + "\n")

    for step in range(start + 1, max_steps + 1):
        time.sleep(step_seconds)
        t = torch.tensor([float(rank + 1)])
        if world > 1:
            dist.all_reduce(t)
        assert t.item() == world * (world + 1) / 2, "all_reduce gave a wrong sum"
        if crash_at and step == crash_at:
            print(f"[fake_trainer] rank {rank}: crashing at step {step} (fake.crash_at_step)", flush=True)
            # as a crash does: no teardown. Returning instead let the interpreter's exit tear down a
            # live gloo process group, which sometimes aborted (SIGABRT, status 134, not 3).
            os._exit(3)
        if rank == 0:
            loss = 5.0 * math.exp(-step / 20.0) + 0.1
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "restart": restart, "world": world}) + "\n")
            print(f"[fake_trainer] step {step}/{max_steps} loss {loss:.4f}", flush=True)
        if all_max(1.0 if _SIGNALS else 0.0) > 0:
            if rank == 0:
                save(ckpt, step)
                print(f"[fake_trainer] signal {_SIGNALS}: saved checkpoint at step {step}, exiting "
                      f"{REQUEUE_EXIT_CODE}", flush=True)
            if world > 1:
                dist.barrier()
                dist.destroy_process_group()
            return REQUEUE_EXIT_CODE
    if rank == 0:
        save(ckpt, max_steps)  # a final checkpoint: a requeue after the end is a no-op
        print("[fake_trainer] done", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Python restores SIG_DFL for handled signals at interpreter shutdown: a repeated USR1 from
    # the launcher in that window would turn "exit 42" into "killed by SIGUSR1". Ignore them now.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
