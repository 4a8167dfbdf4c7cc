"""Checkpoint files without training: layout, marker and checksums, latest, retention, metrics, signals."""
from __future__ import annotations

import json
import os
import signal

import pytest

from pretrain import checkpoint_files as files
from pretrain.checkpoint import truncate_metrics, verify_main
from pretrain.signals import REQUEUE_EXIT_CODE, SignalFlag


def fake_checkpoint(root, step, complete=True, payload=b"x" * 1000):
    d = root / files.step_dir_name(step)
    d.mkdir(parents=True)
    for name in files.REQUIRED_FILES:
        (d / name).write_bytes(name.encode())
    (d / "__0_0.distcp").write_bytes(payload)
    if complete:
        files.write_marker(d, step, files.digest_files(d, files.list_files(d)))
    return d


def test_names_latest_and_listing(tmp_path):
    assert files.step_dir_name(1000) == "step_00001000" and files.step_of("x/step_00001000") == 1000
    for step in (3, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 9, complete=False)  # no marker: never a candidate
    (tmp_path / ".tmp-step_00000012-1-2").mkdir()
    assert [c.step for c in files.list_checkpoints(tmp_path)] == [3, 6]
    assert files.read_latest(tmp_path) is None
    files.write_latest(tmp_path, 6)
    assert (tmp_path / "latest").read_text() == "step_00000006\n"
    assert files.resolve_checkpoint_path(tmp_path / "latest") == tmp_path / "step_00000006"
    assert files.resolve_checkpoint_path(tmp_path) == tmp_path / "step_00000006"
    assert files.clean_stale(tmp_path) == [".tmp-step_00000012-1-2"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_checksums_name_the_bad_file(tmp_path, capsys):
    good = fake_checkpoint(tmp_path, 3)
    assert files.verify_checkpoint(good) == []
    corrupt = fake_checkpoint(tmp_path, 6)
    with open(corrupt / "__0_0.distcp", "r+b") as f:
        f.seek(500)
        f.write(b"y")
    problems = files.verify_checkpoint(corrupt)
    assert len(problems) == 1 and "__0_0.distcp" in problems[0] and "checksum mismatch" in problems[0]
    truncated = fake_checkpoint(tmp_path, 9)
    os.truncate(truncated / "__0_0.distcp", 10)
    assert "truncated" in files.verify_checkpoint(truncated, hash_files=False)[0]
    unfinished = fake_checkpoint(tmp_path, 12, complete=False)
    assert "never finished" in files.verify_checkpoint(unfinished)[0]
    # offline: python -m pretrain.train --verify <dir> names the bad files, exit status 1
    assert verify_main(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "BAD  " + str(corrupt) in out and "__0_0.distcp" in out and "step_00000012" in out
    assert "0 of 4 checkpoint(s) intact" in out  # the fakes' common.pt is no torch file: BAD too


def test_retention():
    assert files.retention_victims([1, 2, 3, 4, 5], keep_last=2, keep_every=0) == [1, 2, 3]
    assert files.retention_victims([2, 4, 6, 8, 10], keep_last=1, keep_every=4) == [2, 6]
    assert files.retention_victims([2, 4, 6], keep_last=1, keep_every=0, protect={2}) == [4]


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"step": 5, "lo')  # a torn last line from a killed writer
    with open(path, "a") as handle:  # the writer's append handle stays valid after the cut
        assert truncate_metrics(path, 2) == 3
        handle.write(json.dumps({"step": 3, "loss": 0.5}) + "\n")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert truncate_metrics(path, 0) == 3 and path.read_text() == ""


def test_signal_flag_records_every_signal():
    flag = SignalFlag(["SIGUSR1", "TERM"]).install()
    try:
        assert not flag.is_set
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal only adds to the record
        assert flag.is_set and flag.received == [signal.SIGUSR1, signal.SIGTERM]
        assert flag.describe() == "SIGUSR1, SIGTERM"
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGUSR1))
    assert REQUEUE_EXIT_CODE == 42
    with pytest.raises(ValueError):
        SignalFlag(["SIGNOPE"])


def test_socket_dir_problem_agrees_with_a_real_manager_at_the_limit():
    """socket_dir_problem against multiprocessing itself: TMPDIRs of 75 and 76 bytes (a Manager's
    socket path of 107 and 108), each in a fresh interpreter that asks the predicate and then starts
    the Manager every save starts (fork, as megatron's save does)."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    probe = ("import multiprocessing as mp, multiprocessing.util as u\n"
             "from pretrain.checkpoint_files import socket_dir_problem\n"
             "print('problem' if socket_dir_problem(u.get_temp_dir()) else 'none')\n"
             "try:\n    mp.get_context('fork').Manager().shutdown(); print('started')\n"
             "except Exception as e:\n    print('failed', type(e).__name__)\n")
    base = tempfile.mkdtemp(prefix="hp-sock-", dir="/tmp")
    try:
        assert files.MAX_TMPDIR == 75
        got = {}
        for length in (75, 76):
            tmpdir = Path(base) / ("d" * (length - len(base) - 1))
            tmpdir.mkdir()
            assert len(str(tmpdir)) == length
            env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(Path(files.__file__).parents[1])}
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
            got[length] = out.stdout.split()
        assert got == {75: ["none", "started"], 76: ["problem", "failed", "EOFError"]}, got
    finally:
        shutil.rmtree(base, ignore_errors=True)
