"""Crash harness: SIGKILL training at random moments (also in the middle of saving), restart, and check
that the result equals an uninterrupted run.

    python scripts/crash_harness.py --workdir /tmp/crash --kills 50 --nproc 2 [--steps N] [--seed 0]

1. Prepares a small dataset (generated text, byte tokenizer) and a tiny hybrid model config.
2. Reference: one uninterrupted run of `--nproc` ranks (python -m pretrain.train, gloo, RANK/WORLD_SIZE).
3. Crash run: the same command, killed `--kills` times with SIGKILL (all ranks; sometimes only the
   trainers, leaving a forked async checkpoint writer orphaned), each time at a random moment picked
   from: start-up/resume, training (a few steps after the resume point), while a checkpoint is being
   written (a .tmp-* directory exists), right after a save was published. Then restarted
   (checkpoint.resume=auto), until a life finishes training.
4. Checks, after every kill: every complete checkpoint verifies (checksums); the next life resumes from
   the newest complete checkpoint (or starts from scratch when there is none) and never reports a
   corrupt one. At the end: metrics.jsonl of the crash run has every step exactly once with the same
   loss as the reference (bit-identical), and the final checkpoints hold identical model and optimizer
   tensors.

Prints one JSON summary line (and writes it to <workdir>/summary.json); exit status 0 when all checks pass.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_MODEL = [
    "model.d_model=32", "model.vocab_size=264", "model.pattern=M*-E",
    "model.mamba.num_heads=4", "model.mamba.head_dim=8", "model.mamba.num_groups=2", "model.mamba.d_state=8",
    "model.mamba.chunk_size=8", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mlp.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ff=24",
    "model.moe.bias_update_rate=0.01",
]
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
SCRATCH = "starting from scratch"
FALLBACK = "falling back to the previous complete checkpoint"


def log(msg: str) -> None:
    print(f"[crash_harness {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_corpus(root: Path, num_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "mamba", "state", "space", "token", "expert", "router",
             "attention", "layer", "norm", "scan", "chunk", "batch", "shard", "save", "resume", "step"]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(num_docs):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))})
                    + "\n")
    return root


def prepare_data(workdir: Path, seq_len: int) -> Path:
    from data.prepare import prepare

    out = workdir / "data"
    if not (out / "index.json").is_file():
        prepare([str(write_corpus(workdir / "corpus"))], "bytes", out, seq_len, progress=False)
    return out


def overrides(workdir: Path, data: Path, name: str, args) -> list[str]:
    return [
        *TINY_MODEL, f"model.pattern={args.pattern}", f"data.path={data}", "data.seq_len=32", "data.micro_batch_size=2",
        f"data.global_batch_size={2 * args.nproc}", "optim.lr=3e-3", "optim.warmup_steps=2",
        f"trainer.max_steps={args.steps}", "trainer.log_interval=1", "trainer.device=cpu", "kernels.backend=torch",
        f"run.dir={workdir / 'runs'}", f"run.name={name}", f"checkpoint.interval={args.interval}",
        f"checkpoint.keep_last={args.keep_last}", f"checkpoint.async_save={str(args.async_save).lower()}",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Life:
    """One launch of all ranks (each its own session, so a kill can take its forked writers too)."""

    def __init__(self, workdir: Path, cmd_args: list[str], nproc: int, tag: str):
        port = free_port()
        self.logs = [workdir / "logs" / f"{tag}_rank{r}.log" for r in range(nproc)]
        self.logs[0].parent.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for rank in range(nproc):
            env = {k: v for k, v in os.environ.items()}
            env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(workdir / "tmp"),
                       OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HP_DIST_TIMEOUT_MIN="5",
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            out = open(self.logs[rank], "w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "pretrain.train", *cmd_args], cwd=REPO, env=env,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            out.close()

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def done(self) -> bool:
        return all(c is not None for c in self.poll())

    def kill(self, whole_group: bool) -> None:
        for p in self.procs:
            try:
                if whole_group:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()

    def reap(self) -> None:
        """Kill what is left of each rank's process group once its rank has ended: a rank killed alone
        leaves its children (a background checkpoint writer, multiprocessing helpers) running, and the
        next life must not share the machine with them (nor may they outlive the harness)."""
        for p in self.procs:
            if p.poll() is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
        return [p.returncode for p in self.procs]

    def text(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return -1


def check_checkpoints(ckpt_root: Path) -> tuple[int | None, list[str]]:
    """(newest complete step, problems of any complete checkpoint)."""
    from pretrain import checkpoint_files as files

    problems, newest = [], None
    for info in files.list_checkpoints(ckpt_root):
        bad = files.verify_checkpoint(info.path)
        problems += bad
        if not bad:
            newest = info.step
    return newest, problems


def model_tensors(ckpt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent.parent / f".{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, map_location="cpu", weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if hasattr(v, "shape") and hasattr(v, "dtype")}


def run(args) -> dict:  # noqa: C901 - one linear story
    workdir = Path(args.workdir).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    from data.dataset import clean_stale_streaming_shm

    t0 = time.time()
    data = prepare_data(workdir, 32)
    summary = {"kills": 0, "modes": {}, "kills_mid_save": 0, "lives": 0, "resumes_checked": 0, "problems": [],
               "harness_invocations": 0}
    state_file = workdir / "harness_state.json"
    expected_resume: int | None = None
    continuing = args.continue_run and state_file.is_file()
    if continuing:
        saved = json.loads(state_file.read_text())
        summary, expected_resume = saved["summary"], saved["expected_resume"]
    summary["harness_invocations"] += 1
    rng = random.Random(args.seed * 1000003 + summary["lives"])

    # ---- reference
    ref_name = f"reference-{args.steps}steps-{args.nproc}ranks"
    ref_metrics = workdir / "runs" / ref_name / "metrics.jsonl"
    if not (workdir / "runs" / ref_name / "checkpoints" / "latest").is_file():
        shutil.rmtree(workdir / "runs" / ref_name, ignore_errors=True)
        log(f"reference: {args.steps} steps on {args.nproc} rank(s)")
        life = Life(workdir, overrides(workdir, data, ref_name, args), args.nproc, "reference")
        codes = life.wait(args.life_timeout)
        life.reap()
        clean_stale_streaming_shm(workdir / "tmp")
        if codes != [0] * args.nproc:
            raise SystemExit(f"reference run failed with {codes}; see {life.logs[0]}")
    summary["reference_seconds"] = round(time.time() - t0, 1)

    # ---- crash run
    name = "crash"
    run_dir = workdir / "runs" / name
    if not continuing:
        shutil.rmtree(run_dir, ignore_errors=True)
    ckpt_root = run_dir / "checkpoints"
    metrics = run_dir / "metrics.jsonl"
    if continuing:  # the harness itself may have been stopped after a save was published
        expected_resume = check_checkpoints(ckpt_root)[0]
    t1 = time.time()
    while True:
        if args.deadline_seconds and time.time() - t0 > args.deadline_seconds and summary["kills"] < args.kills:
            state_file.write_text(json.dumps({"summary": summary, "expected_resume": expected_resume}))
            summary["incomplete"] = True
            summary["ok"] = False
            log(f"deadline reached after {summary['kills']} kills: run again with --continue-run")
            return summary
        summary["lives"] += 1
        tag = f"life{summary['lives']:03d}"
        life = Life(workdir, overrides(workdir, data, name, args), args.nproc, tag)
        resume_checked = False
        plan = None
        if summary["kills"] < args.kills:
            mode = rng.choices(["startup", "train", "save", "published"], weights=[1, 4, 4, 1])[0]
            # half of the lives first let one more checkpoint be published, so that training advances
            plan = {"mode": mode, "whole_group": rng.random() < 0.8, "delay": rng.uniform(0, 0.4),
                    "progress_first": mode != "startup" and rng.random() < 0.5,
                    "startup_delay": rng.uniform(0.5, args.startup_seconds),
                    "extra_steps": rng.randint(1, 2 * args.interval)}
        began = time.time()
        seen_tmp = set()
        killed_mid_save = False
        killed = False
        base_step = None
        while not life.done():
            if time.time() - began > args.life_timeout:
                life.kill(True)
                summary["problems"].append(f"{tag}: no progress within {args.life_timeout}s (hang?); see {life.logs[0]}")
                break
            text = life.text(0)
            if not resume_checked and (RESUMED.search(text) or SCRATCH in text):
                resume_checked = True
                m = RESUMED.search(text)
                got = int(m.group(2)) if m else None
                summary["resumes_checked"] += 1
                if got != expected_resume:
                    summary["problems"].append(f"{tag}: resumed from step {got}, expected {expected_resume}")
                if FALLBACK in text:
                    summary["problems"].append(f"{tag}: reported a corrupt checkpoint: see {life.logs[0]}")
                base_step = got or 0
            if plan is not None and plan["progress_first"] and base_step is not None:
                newest, _ = check_checkpoints(ckpt_root)
                if newest is not None and newest > base_step:
                    plan["progress_first"] = False
                    base_step = newest
            if plan is not None and not plan["progress_first"]:
                mode = plan["mode"]
                fire = False
                if mode == "startup":
                    fire = time.time() - began >= plan["startup_delay"]
                elif base_step is not None and mode == "train":
                    fire = last_step(metrics) >= base_step + plan["extra_steps"]
                elif base_step is not None and mode == "save":
                    tmps = {p.name for p in ckpt_root.glob(".tmp-*")} if ckpt_root.is_dir() else set()
                    if tmps - seen_tmp and last_step(metrics) > base_step:
                        fire = True
                    seen_tmp |= tmps
                elif base_step is not None and mode == "published":
                    newest, _ = check_checkpoints(ckpt_root)
                    fire = newest is not None and newest > base_step
                if fire:
                    time.sleep(plan["delay"] if mode != "startup" else 0)
                    killed_mid_save = any(ckpt_root.glob(".tmp-*")) if ckpt_root.is_dir() else False
                    life.kill(plan["whole_group"])
                    killed = True
                    summary["kills"] += 1
                    summary["modes"][mode] = summary["modes"].get(mode, 0) + 1
                    summary["kills_mid_save"] += int(killed_mid_save)
                    break
            time.sleep(0.02)
        codes = life.poll()
        life.reap()
        clean_stale_streaming_shm(workdir / "tmp")
        if not resume_checked and life.logs[0].exists():
            text = life.text(0)
            m = RESUMED.search(text)
            if m or SCRATCH in text:
                got = int(m.group(2)) if m else None
                summary["resumes_checked"] += 1
                if got != expected_resume:
                    summary["problems"].append(f"{tag}: resumed from step {got}, expected {expected_resume}")
        newest, problems = check_checkpoints(ckpt_root)
        summary["problems"] += [f"after {tag}: {p}" for p in problems]
        expected_resume = newest
        state_file.write_text(json.dumps({"summary": summary, "expected_resume": expected_resume}))
        if killed:
            log(f"{tag}: killed ({plan['mode']}{', mid-save' if killed_mid_save else ''}"
                f"{'' if plan['whole_group'] else ', trainers only'}) at step {last_step(metrics)}; "
                f"newest complete checkpoint: {newest}")
            continue
        if codes == [0] * args.nproc:
            log(f"{tag}: finished training ({summary['kills']} kills)")
            break
        summary["problems"].append(f"{tag}: exited with {codes} without a kill; see {life.logs[0]}")
        break
    summary["crash_seconds"] = round(time.time() - t1, 1) + summary.get("crash_seconds", 0)
    state_file.unlink(missing_ok=True)

    # ---- compare
    ref = [json.loads(line) for line in ref_metrics.read_text().splitlines()]
    got = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    ref_steps, got_steps = [r["step"] for r in ref], [r["step"] for r in got]
    summary["steps"] = args.steps
    if got_steps != list(range(1, args.steps + 1)):
        summary["problems"].append(f"crash-run metrics.jsonl steps are not 1..{args.steps} exactly once: {got_steps}")
    mismatched = [r["step"] for r, g in zip(ref, got) if r["step"] != g["step"] or r["loss"] != g["loss"]]
    if mismatched or ref_steps != got_steps:
        summary["problems"].append(f"losses differ from the reference at steps {mismatched[:10]}")
    summary["losses_identical"] = not mismatched and ref_steps == got_steps
    try:
        from pretrain import checkpoint_files as files

        a = model_tensors(files.read_latest(workdir / "runs" / ref_name / "checkpoints"))
        b = model_tensors(files.read_latest(ckpt_root))
        differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not bool((a[k] == b[k]).all()))
        summary["final_tensors_identical"] = not differ
        summary["num_tensors_compared"] = len(a)
        if differ:
            summary["problems"].append(f"final checkpoint tensors differ: {differ[:10]}")
    except Exception as err:  # noqa: BLE001
        summary["problems"].append(f"comparing final checkpoints failed: {type(err).__name__}: {err}")
    summary["ok"] = not summary["problems"] and summary["kills"] >= args.kills
    if summary["kills"] < args.kills:
        summary["problems"].append(f"training finished after {summary['kills']} of {args.kills} kills (raise --steps)")
    summary["seconds"] = round(time.time() - t0, 1)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="training steps (default: 3 x kills + 10)")
    p.add_argument("--interval", type=int, default=3, help="checkpoint.interval")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--async-save", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pattern", default="M*-E", help="model.pattern of the tiny model")
    p.add_argument("--startup-seconds", type=float, default=8.0, help="startup kills happen within this")
    p.add_argument("--life-timeout", type=float, default=600.0)
    p.add_argument("--fresh", action="store_true", help="delete the workdir first (else reuse the reference)")
    p.add_argument("--deadline-seconds", type=float, default=0.0,
                   help="stop (saving the harness state) when this much time has passed; 0 = no limit")
    p.add_argument("--continue-run", action="store_true", help="continue a run stopped by --deadline-seconds")
    args = p.parse_args(argv)
    if args.steps <= 0:
        args.steps = 3 * args.kills + 10
    args.async_save = bool(args.async_save)
    summary = run(args)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
