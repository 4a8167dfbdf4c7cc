"""Fixtures for the data tests: a private TMPDIR per test (streaming's filelocks) and shared-memory cleanup.

mosaicml-streaming registers every shared-memory block with atexit, so each StreamingDataset keeps its
blocks (two file descriptors each: the fd and the mmap's copy) until the process exits: a few hundred
fds per dataset. One training process builds one or two; the test session builds hundreds and ran out of
file descriptors (ulimit -n 20000). After each test, the blocks its datasets created are released as
streaming would at exit."""
from __future__ import annotations

import atexit
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
    before = _streaming_shm_ids()
    yield tmp
    gc.collect()
    _release_streaming_shm(before)
    if any(name.endswith("_filelock") for name in os.listdir(tmp)):  # streaming was used
        from data.dataset import clean_stale_streaming_shm
        clean_stale_streaming_shm(tmp)


def _streaming_shm_objects():
    from streaming.base.shared.memory import SharedMemory

    # type(), not isinstance(): isinstance reads __class__ through a dead weakref.proxy that another
    # test module left in this worker and raises ReferenceError
    return [obj for obj in gc.get_objects() if issubclass(type(obj), SharedMemory)]


def _streaming_shm_ids() -> set[int]:
    return {id(obj) for obj in _streaming_shm_objects()}


def _release_streaming_shm(before: set[int]) -> None:
    """Run streaming's exit-time cleanup now for the blocks created during the test (closes their fds)."""
    for obj in _streaming_shm_objects():
        if id(obj) in before:
            continue
        atexit.unregister(obj.cleanup)
        try:
            obj.cleanup()
        except BufferError:  # a numpy view of the block is still alive: leave it to the exit handler
            atexit.register(obj.cleanup)
