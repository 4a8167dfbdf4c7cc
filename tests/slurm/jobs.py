"""The Slurm tests' view of the local cluster's queue: `scontrol show job` as a dict, a job's log,
the queue with each job's reason, cancelling everything (bounded), and a report of queue and nodes
for failure messages (a pending job says why it is pending: Resources, ReqNodeNotAvail, ...)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

FINAL = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def job_log(workdir: Path, job: str) -> str:
    """The job's output file (<name>-<id>.out in the submit directory), or a note that it has none."""
    logs = list(workdir.glob(f"*-{job}.out"))
    return logs[0].read_text() if logs else f"(no log for job {job}: it has not started)"


def queued_jobs() -> list[str]:
    """Every job in the queue, one line each: id, name, state, and its reason (pending) or nodes."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T %R"], capture_output=True, text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def cluster_report() -> str:
    """The queue and the nodes' states (with any DOWN/DRAIN reason), for failure messages."""
    nodes = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %t %E"], capture_output=True, text=True, timeout=30)
    return ("queue:\n  " + ("\n  ".join(queued_jobs()) or "(empty)")
            + "\nnodes:\n  " + ("\n  ".join(nodes.stdout.strip().splitlines()) or "(sinfo printed nothing)"))


def cancel_all_jobs(timeout: float = 90) -> list[str]:
    """scancel every queued job and wait until the queue is empty (KillWait=30 s lets a job that
    ignores SIGTERM live that long). Returns what was queued; raises if it does not empty in time."""
    left = queued_jobs()
    if not left:
        return left
    subprocess.run(["scancel", *(line.split()[0] for line in left)], capture_output=True, timeout=30)
    deadline = time.monotonic() + timeout
    while queued_jobs():
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs still queued {timeout} s after scancel\n{cluster_report()}")
        time.sleep(0.5)
    return left
