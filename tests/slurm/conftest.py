"""Slurm tests: a real single-host Slurm (slurm/local_cluster.sh, 2 simulated nodes) for the session.

Tests marked `slurm` are skipped, with the reason, when not root (installing and starting the
daemons needs it), when HP_SKIP_SLURM=1, or when the cluster cannot start. The cluster is stopped
at the end of the session unless it was already up before (then it is left as it was).

The tests need the cluster to themselves: jobs already in its queue when the session starts (left
by an earlier run that was killed, say, whose stale allocation would keep every test job pending)
are cancelled, with a line naming them, and so is every job a test leaves behind, pass or fail,
so that one test's stuck job cannot starve the next.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm.jobs import cancel_all_jobs

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
START_TIMEOUT_S = 300  # first start installs 8 Debian packages (~15 s here; slow mirrors take longer)
_cluster_up = False  # set while the session's cluster is up


def _skip_reason() -> str | None:
    if os.environ.get("HP_SKIP_SLURM") == "1":
        return "HP_SKIP_SLURM=1"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: slurm/local_cluster.sh installs Slurm and starts its daemons"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "needs Debian's apt-get (or Slurm installed) for slurm/local_cluster.sh"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"slurm tests skipped: {reason}")
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SLURM_LOCAL_NODES": "2"})


@pytest.fixture(scope="session")
def slurm_cluster():
    """Starts the local 2-node cluster once per session (stopping it at the end if we started it)."""
    global _cluster_up
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(f"slurm tests skipped: {reason}")
    was_up = _cluster("status", 30).returncode == 0
    t0 = time.monotonic()
    try:
        res = _cluster("start", START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"slurm tests skipped: slurm/local_cluster.sh start took over {START_TIMEOUT_S} s")
    if res.returncode != 0:
        _cluster("stop", 120)
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        pytest.skip(f"slurm tests skipped: slurm/local_cluster.sh start failed (rc={res.returncode}):\n{tail}")
    print(f"\nlocal Slurm up in {time.monotonic() - t0:.1f} s")
    _cluster_up = True
    left = cancel_all_jobs()
    if left:
        print("cancelled the jobs an earlier run left in the local cluster's queue:\n  " + "\n  ".join(left))
    yield CLUSTER
    _cluster_up = False
    if not was_up:
        _cluster("stop", 180)


@pytest.fixture(autouse=True)
def _no_jobs_left_behind():
    """After each Slurm test, cancel whatever it left in the queue (a failed test's jobs included)."""
    yield
    if _cluster_up:
        cancel_all_jobs()


@pytest.fixture
def job_dir(request):
    """A submit directory for Slurm jobs. Not pytest's tmp_path: other pytest sessions of the same
    user prune old /tmp/pytest-of-<user> directories, which can delete it under a running job.
    Removed afterwards unless the test failed or HP_KEEP_SLURM_TMP=1."""
    path = Path(tempfile.mkdtemp(prefix=f"hp-slurm-{request.node.name[:40]}-"))
    yield path
    report = getattr(request.node, "rep_call", None)
    if os.environ.get("HP_KEEP_SLURM_TMP") != "1" and report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"\nslurm job directory kept: {path}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report
