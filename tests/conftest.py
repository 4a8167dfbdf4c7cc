"""Shared pytest setup: how the suite is spread over pytest-xdist workers, marker skips (gpu without
CUDA) and a small model config for unit tests.

Workers (pyproject's `-n auto --dist loadgroup`): on a machine without CUDA, one per core up to 4.
Much of the suite waits (Slurm's requeue delays, spawned ranks' start-up, checkpoint writers) or
runs one single-threaded interpreter, so two workers on the 2-core CI machine overlap that. Each test
file goes to one worker as a whole (its module-scoped fixtures, often the expensive part, run once),
and every Slurm test goes to the same worker (one local cluster). With CUDA: one worker, so the GPU
tests never share the card. `pytest -n 0` runs everything in this one process, as before.

Temporary directories: pytest's usual root /tmp/pytest-of-<user>/pytest-<N>/ plus xdist's
popen-gw<N>/ leaves too few bytes for the UNIX socket that every checkpoint save opens under a
test's TMPDIR (pretrain.checkpoint_files.socket_dir_problem: 107 bytes in all), so the session's
root is a short /tmp/hp-pytest-XXXXXXXX (the newest KEEP_BASETEMPS are kept, as pytest keeps its own).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

MAX_CPU_WORKERS = 4  # each worker imports torch and megatron and may spawn up to 8 ranks
BASETEMP_PREFIX = "hp-pytest-"
KEEP_BASETEMPS = 3


def pytest_configure(config):
    if config.option.basetemp or hasattr(config, "workerinput"):  # given, or a worker (xdist passes its own)
        return
    root = Path(tempfile.gettempdir())
    old = sorted(root.glob(BASETEMP_PREFIX + "*"), key=lambda p: p.stat().st_mtime)
    for path in old[:max(0, len(old) - KEEP_BASETEMPS + 1)]:
        shutil.rmtree(path, ignore_errors=True)
    config.option.basetemp = tempfile.mkdtemp(prefix=BASETEMP_PREFIX, dir=root)


def pytest_xdist_auto_num_workers(config):
    if torch.cuda.is_available():
        return 1
    return max(1, min(MAX_CPU_WORKERS, len(os.sched_getaffinity(0))))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
