"""slurm/train.sbatch against a real local Slurm (2 simulated nodes, CPU): completion, requeue after
`scancel --signal=USR1 --batch` and near the time limit (USR1 -> checkpoint -> requeue -> resume),
and no requeue loop after crashes.

The trainer is the stand-in tests/slurm/fake_trainer.py (HP_TRAIN_MODULE), which follows the
trainer's contract: SIGUSR1/SIGTERM -> checkpoint at the next step, exit 42; resume from
checkpoints/latest; one metrics.jsonl line per step on rank 0. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.jobs import FINAL, cluster_report, job_info, job_log

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"


def submit(workdir: Path, *args: str, sbatch_opts: tuple[str, ...] = (), env: dict | None = None) -> str:
    cfg = workdir / "fake.yaml"
    if not cfg.exists():
        cfg.write_text("trainer:\n  max_steps: 10\n")
    full_env = {**os.environ, "HP_REPO": str(REPO), "HP_TRAIN_MODULE": "tests.slurm.fake_trainer",
                "HP_RESIGNAL_SECONDS": "15", **(env or {})}
    res = subprocess.run(["sbatch", "--parsable", *sbatch_opts, str(SBATCH), "fake.yaml", *args],
                         cwd=workdir, env=full_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def wait_final(workdir: Path, job: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(0.5)
    pytest.fail(f"job {job} not finished after {timeout} s: {job_info(job).get('JobState')}\n"
                f"{cluster_report()}\n{job_log(workdir, job)}")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{cluster_report()}")


def run_dir(workdir: Path, job: str, name: str = "hp-train") -> Path:
    return workdir / "runs" / f"{name}-{job}"


def steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def starts(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines() if line.strip()]


def test_two_nodes_run_to_completion(slurm_cluster, job_dir):
    job = submit(job_dir, "trainer.max_steps=5", "fake.step_seconds=0.05", sbatch_opts=("--nodes=2",))
    info = wait_final(job_dir, job, 300)
    log = job_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", log
    run = run_dir(job_dir, job)
    assert steps(run) == [1, 2, 3, 4, 5]
    (first,) = starts(run)
    assert first["world"] == 2 and sorted(first["nodes"]) == ["node1", "node2"]
    # the job's log is also kept in the run directory
    assert "training finished" in (run / "logs" / f"slurm-{job}.out").read_text()


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, job_dir):
    total = 30
    job = submit(job_dir, f"trainer.max_steps={total}", "fake.step_seconds=0.3", sbatch_opts=("--nodes=2",))
    run = run_dir(job_dir, job)
    wait_for(lambda: len(steps(run)) >= 3, 240, "the first training steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_final(job_dir, job, 300)
    log = job_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    assert steps(run) == list(range(1, total + 1)), log  # none missing, none twice
    first, second = starts(run)
    assert first["restart"] == 0 and first["start"] == 0
    assert second["restart"] == 1 and 3 <= second["start"] < total, "did not resume from the checkpoint"
    assert "requeueing job" in log and log.count("run hp-train-") == 2  # --open-mode=append kept both runs


def test_time_limit_signal_requeues_until_done(slurm_cluster, job_dir):
    # The first run outlasts its 1-minute limit (60 x 1 s). slurmctld checks limits every 30 s and
    # signals once less than @+30 s are left, i.e. here 20-50 s after the start; the trainer saves,
    # the job requeues itself; the next run (fast steps) finishes before its own signal.
    # (With @30, every run would be signalled at the first check, 0-30 s after its start.)
    total = 60
    job = submit(job_dir, f"trainer.max_steps={total}", "fake.step_seconds=1",
                 "fake.step_seconds_after_restart=0.02",
                 sbatch_opts=("--nodes=2", "--time=1", "--signal=B:USR1@10"))
    info = wait_final(job_dir, job, 300)
    log = job_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1, log
    run = run_dir(job_dir, job)
    assert steps(run) == list(range(1, total + 1)), log  # none missing, none twice
    restarts = int(info["Restarts"])
    assert [s["restart"] for s in starts(run)] == list(range(restarts + 1))
    assert all(s["start"] > 0 for s in starts(run)[1:]), "a restart did not resume from the checkpoint"
    assert log.count("run hp-train-") == restarts + 1  # --open-mode=append kept every run's output


def test_crash_is_not_requeued_and_requeue_on_failure_is_bounded(slurm_cluster, job_dir):
    # Both jobs run side by side (each takes 1 CPU of each node).
    crash = submit(job_dir, "trainer.max_steps=10", "fake.step_seconds=0.05", "fake.crash_at_step=2",
                   sbatch_opts=("--nodes=2", "-J", "crash"))
    bounded = submit(job_dir, "trainer.max_steps=10", "fake.step_seconds=0.05", "fake.crash_at_step=2",
                     sbatch_opts=("--nodes=1", "-J", "bounded"),
                     env={"HP_REQUEUE_ON_FAILURE": "1", "HP_MAX_RESTARTS": "1"})
    info = wait_final(job_dir, crash, 300)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", job_log(job_dir, crash)
    assert info["Restarts"] == "0"
    info = wait_final(job_dir, bounded, 300)
    log = job_log(job_dir, bounded)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log
    assert "not requeueing: already restarted 1 times" in log
