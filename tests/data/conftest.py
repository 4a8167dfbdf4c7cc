"""Fixtures for the data tests: a private TMPDIR per test (streaming's filelocks) and shared-memory cleanup."""
from __future__ import annotations

import gc
import os
import tempfile

import pytest

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    """Each test gets its own TMPDIR (streaming's filelocks); stale streaming shared memory is removed after."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches its first answer
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    yield tmp
    gc.collect()
    if any(name.endswith("_filelock") for name in os.listdir(tmp)):  # streaming was used
        from data.dataset import clean_stale_streaming_shm
        clean_stale_streaming_shm(tmp)
