"""Save and resume with two gloo ranks (dp=2, the megatron DDP + distributed optimizer build): a signal on
one rank stops both at the same step with a checkpoint, the resumed run continues bit-identically; a
dp=2 checkpoint resumes in one process (dp=1) with the same weights, optimizer state and data order."""
from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_helpers import (launch_ranks, model_tensors, prepare_dataset, read_losses, tiny_overrides,  # noqa: E402
                          wait_all)

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


@pytest.fixture(scope="module")
def single(reference):
    """The same training in one process (dp=1: 4 micro-batches of 2 per step), torch AdamW."""
    ref, data = reference
    codes = wait_all(launch_ranks(1, args(ref, data, "single"), ref / "tmpdir", ref / "logs", "single"))
    assert codes == [0], (ref / "logs" / "single_rank0.log").read_text()[-3000:]
    return read_losses(ref / "runs", "single")


def assert_close_curves(got: dict, want: dict) -> None:
    """Loss curves of the single-process and the dp=2 build from the same state and data. The first
    step's loss comes from the same weights and samples: only the float32 summation order differs
    (~1e-6 relative). Each Adam update then amplifies such rounding differences (m / sqrt(v) of
    near-zero gradient coordinates): measured, they grow ~2-4x per step (2e-6, 2e-5, 4e-5, 1.3e-4 over
    the first steps from scratch). A wrong optimizer state shows at the second step as ~1e-3."""
    steps = sorted(got)
    assert steps == sorted(want)
    for i, s in enumerate(steps):
        assert got[s] == pytest.approx(want[s], rel=(1e-5, 1e-4)[i] if i < 2 else 2e-3), s


def test_one_process_matches_two_ranks(reference, single):
    """The global batch, the data order and the update are the same at dp=1 and dp=2."""
    ref, _ = reference
    assert_close_curves(single, read_losses(ref / "runs", "ref"))


def test_dp2_checkpoint_resumes_in_one_process(reference, single, tmp_path):
    ref, data = reference
    ckpt = ref / "runs/ref/checkpoints/step_00000003"
    run = [*args(tmp_path, data, "dp1"), f"checkpoint.resume={ckpt}"]
    assert wait_all(launch_ranks(1, run, tmp_path / "tmpdir", tmp_path / "logs", "dp1")) == [0]
    log = (tmp_path / "logs" / "dp1_rank0.log").read_text()
    assert "resharding checkpoint step_00000003" in log and "at step 3" in log
    want = {s: v for s, v in read_losses(ref / "runs", "ref").items() if s > 3}
    assert_close_curves(read_losses(tmp_path / "runs", "dp1"), want)


def test_one_process_checkpoint_resumes_on_two_ranks(reference, single, tmp_path):
    ref, data = reference
    ckpt = ref / "runs/single/checkpoints/step_00000003"
    run = [*args(tmp_path, data, "dp2"), f"checkpoint.resume={ckpt}"]
    assert wait_all(launch_ranks(2, run, tmp_path / "tmpdir", tmp_path / "logs", "dp2")) == [0, 0]
    assert "at step 3" in (tmp_path / "logs" / "dp2_rank0.log").read_text()
    want = {s: v for s, v in single.items() if s > 3}
    assert_close_curves(read_losses(tmp_path / "runs", "dp2"), want)


def test_dp2_checkpoint_loads_exactly_in_one_process(reference, tmp_path, monkeypatch):
    """Load the dp=2 (distributed optimizer) checkpoint of step 3 into one process (torch AdamW) and save
    it again at once: the same model and Adam tensors under the same keys, and the same step count."""
    import torch

    from pretrain.checkpoint import Checkpointer
    from pretrain.train import main

    ref, data = reference
    ckpt = ref / "runs/ref/checkpoints/step_00000003"
    original = Checkpointer.load

    def load_then_save_again(self, path, trainer):
        step = original(self, path, trainer)
        self.last_saved_step = None  # the final save (max_steps=3 = the resumed step) writes what was loaded
        return step

    monkeypatch.setattr(Checkpointer, "load", load_then_save_again)
    assert main([*tiny_overrides(tmp_path / "runs", data, "copy", 3), *BATCH, f"checkpoint.resume={ckpt}"]) == 0
    copy = tmp_path / "runs/copy/checkpoints/step_00000003"
    # megatron chains a dense and an expert optimizer (MoE) and prefixes their keys chained_<i>.
    a = {re.sub(r"^chained_\d+\.", "", k): v for k, v in model_tensors(ckpt).items()}
    b = model_tensors(copy)
    keys = [k for k in a if not k.startswith("optimizer.state.param.")]  # the fp32 main params = the model's
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in keys)
    assert sorted(keys) == sorted(b)
    assert [k for k in keys if not torch.equal(a[k], b[k])] == []
    meta = torch.load(copy / "common.pt", weights_only=False)["optimizer"]["meta"]
    assert set(meta["steps"].values()) == {3.0}
