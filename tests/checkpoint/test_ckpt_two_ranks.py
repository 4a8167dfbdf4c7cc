"""Save and resume with two gloo ranks (dp=2, the megatron DDP + distributed optimizer build): a signal on
one rank stops both at the same step with a checkpoint, the resumed run continues bit-identically; a
dp=2 checkpoint resumes in one process (dp=1) with the same weights, optimizer state and data order."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_helpers import launch_ranks, prepare_dataset, read_losses, tiny_overrides, wait_all  # noqa: E402

from pretrain import checkpoint_files as files  # noqa: E402
from pretrain.signals import REQUEUE_EXIT_CODE  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 8
# dp=2 x 2 micro-batches of 2 = 8 samples per step; in one process: 4 micro-batches of 2
BATCH = ["data.micro_batch_size=2", "data.global_batch_size=8", "checkpoint.interval=3"]


def args(tmp: Path, data: Path, name: str) -> list[str]:
    return [*tiny_overrides(tmp / "runs", data, name, STEPS), *BATCH]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_rank_reference")
    (tmp / "tmpdir").mkdir()
    data = prepare_dataset(tmp)
    codes = wait_all(launch_ranks(2, args(tmp, data, "ref"), tmp / "tmpdir", tmp / "logs", "ref"))
    assert codes == [0, 0], (tmp / "logs" / "ref_rank0.log").read_text()[-3000:]
    return tmp, data


def model_tensors(ckpt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f".{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, map_location="cpu", weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def last_logged_step(metrics: Path) -> int:
    try:
        return max((json.loads(line)["step"] for line in metrics.read_text().splitlines()), default=0)
    except (OSError, ValueError):
        return 0


def test_signal_on_one_rank_then_bit_identical_resume(reference, tmp_path):
    ref, data = reference
    procs = launch_ranks(2, args(tmp_path, data, "run"), tmp_path / "tmpdir", tmp_path / "logs", "life1")
    deadline = time.time() + 300
    while last_logged_step(tmp_path / "runs" / "run" / "metrics.jsonl") < 4 and time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a rank ended before the signal"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1: the ranks agree at the next step boundary
    assert wait_all(procs) == [REQUEUE_EXIT_CODE] * 2
    root = tmp_path / "runs" / "run" / "checkpoints"
    stopped = files.step_of(files.read_latest(root))
    assert 4 <= stopped < STEPS and files.verify_checkpoint(root / files.step_dir_name(stopped)) == []
    assert wait_all(launch_ranks(2, args(tmp_path, data, "run"), tmp_path / "tmpdir", tmp_path / "logs", "life2")) == [0, 0]
    assert f"at step {stopped}" in (tmp_path / "logs" / "life2_rank0.log").read_text()
    want, got = read_losses(ref / "runs", "ref"), read_losses(tmp_path / "runs", "run")
    assert list(got) == list(range(1, STEPS + 1))
    assert got == want  # bit-identical: same data order, same model, optimizer (Adam step counts) and RNG
    a = model_tensors(ref / "runs/ref/checkpoints/step_00000008")
    b = model_tensors(root / "step_00000008")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
