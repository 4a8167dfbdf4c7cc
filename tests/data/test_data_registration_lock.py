"""The host-wide lock around streaming's shared-memory registration (data.registration_lock): two jobs that
build their datasets at the same moment get different prefixes, and the lock's takers never hold one
host's lock while they wait for another's (no deadlock between multi-node jobs)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_test_utils import write_corpus

from data.prepare import prepare
from data.registration_lock import streaming_registration_lock

WORKER = Path(__file__).with_name("registration_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{name}.json"
    tmpdir = tmp_path / f"tmp_{name}"  # each its own TMPDIR, as separate jobs have
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=f"{ROOT}{os.pathsep}{WORKER.parent}")
    proc = subprocess.Popen([sys.executable, str(WORKER), *args, str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _go(go_file: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Wait until every process has done its imports (its ready file), then let them all start."""
    deadline = time.monotonic() + timeout
    while len(list(go_file.parent.glob(go_file.name + ".ready.*"))) < len(procs):
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a worker exited before it was ready: {proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, "workers not ready"
        time.sleep(0.05)
    go_file.touch()


def _results(runs: list[tuple[subprocess.Popen, Path]], finish: Path | None = None,
             timeout: float = 120) -> list[dict]:
    """Each run's output; with `finish`, first wait for all outputs, then let the runs end."""
    deadline = time.monotonic() + timeout
    while finish and not all(out.exists() or proc.poll() is not None for proc, out in runs):
        assert time.monotonic() < deadline, "workers did not report"
        time.sleep(0.05)
    if finish:
        finish.touch()
    results = []
    for proc, out in runs:
        log = proc.communicate(timeout=timeout)[0]
        assert proc.returncode == 0 and out.exists(), log[-3000:]
        results.append(json.loads(out.read_text()))
    return results


@pytest.fixture
def mds(tmp_path):
    out = tmp_path / "mds"
    prepare([write_corpus(tmp_path / "corpus")], "bytes", out, 16, progress=False)
    return out


@pytest.mark.parametrize("mode", ["raw", "loader"])
def test_two_jobs_building_at_once(mode, mds, tmp_path):
    """Two processes (own TMPDIRs, like two jobs on a node) build a dataset at the same moment with streaming's
    probe-to-create window widened to 1 s. A plain StreamingDataset (the control: shows the race is real
    here) fails in one of them with FileExistsError on the locals block; build_train_loader gives both a
    dataset, on different prefixes."""
    go = tmp_path / "go"
    runs = [_start(tmp_path, f"{mode}{i}", "build", mode, str(mds), str(go)) for i in range(2)]
    # raw: the test holds the host's lock, so no other test worker registers a prefix in the window (that
    # would fail both); loader: the workers take it themselves
    with streaming_registration_lock() if mode == "raw" else contextlib.nullcontext():
        _go(go, [proc for proc, _ in runs])
        results = _results(runs, finish=tmp_path / "go.finish")  # both datasets alive until both are built
    if mode == "raw":
        errors = [r["error"] for r in results if "error" in r]
        assert len(errors) == 1 and "FileExistsError" in errors[0] and "_locals" in errors[0], results
    else:
        assert all("prefix" in r for r in results), results
        assert results[0]["prefix"] != results[1]["prefix"], results


def test_takers_do_not_hold_one_hosts_lock_while_waiting_for_anothers(tmp_path):
    """Two "hosts" are two lock files X and Y; the test holds Y. A 2-rank gloo job needs X (rank 0) and Y
    (rank 1); a one-process job asks for X 1 s later. The one-process job must get X while Y is still held
    (a 2-rank job that kept X while waiting for Y would block it), and the 2-rank job gets both once the
    test lets go of Y."""
    lock_x, lock_y, go = tmp_path / "x.lock", tmp_path / "y.lock", tmp_path / "go"
    fd = os.open(lock_y, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        pair = [_start(tmp_path, f"pair{r}", "lock", str(r), "2", str(tmp_path / "gloo_init"), str(lock), str(go), "0")
                for r, lock in enumerate([lock_x, lock_y])]
        single = _start(tmp_path, "single", "lock", "0", "1", "-", str(lock_x), str(go), "1.0")
        _go(go, [proc for proc, _ in [*pair, single]])
        deadline = time.monotonic() + 30
        while not single[1].exists() and time.monotonic() < deadline and single[0].poll() is None:
            time.sleep(0.05)
        assert single[1].exists(), "the one-process job did not get X while Y was held"
        assert not any(out.exists() for _, out in pair), "the 2-rank job went on without Y"
    finally:
        released = time.time()
        os.close(fd)
    pair0, pair1, _ = _results([*pair, single])
    assert min(pair0["acquired"], pair1["acquired"]) >= released, (released, pair0, pair1)


def test_world_size_without_a_process_group_is_refused(mds, monkeypatch):
    """With WORLD_SIZE > 1 and no process group every rank would take the lock alone and wait for the others
    inside streaming's barrier: refused before anything is built."""
    from data.dataset import build_train_loader

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* torch.distributed is not initialised"):
        build_train_loader(mds, seq_len=16, micro_batch_size=2, seed=1)
