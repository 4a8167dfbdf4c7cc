"""Checkpoint tests: a private TMPDIR per test (streaming's filelocks and shared memory), cleaned after."""
from __future__ import annotations

import gc
import tempfile

import pytest

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    yield tmp
    gc.collect()
    from data.dataset import clean_stale_streaming_shm

    clean_stale_streaming_shm(tmp)


@pytest.fixture(autouse=True)
def fresh_signal_flag():
    """Trainers in one test process each install the process-wide signal flag; start every test clean."""
    from pretrain.signals import reset_process_flag

    reset_process_flag()
    yield
    reset_process_flag()
