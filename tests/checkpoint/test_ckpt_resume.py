"""Save and resume in one process (world size 1, gloo): bit-identical continuation, signals -> exit 42,
a corrupt newest checkpoint falls back to the previous one, failed async saves, retention, mismatches."""
from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_helpers import model_tensors, prepare_dataset, read_losses, tiny_overrides  # noqa: E402

from pretrain import checkpoint_files as files  # noqa: E402
from pretrain.signals import REQUEUE_EXIT_CODE, reset_process_flag  # noqa: E402

STEPS = 8


def train(tmp: Path, name: str, *extra: str, steps: int = STEPS, signal_at: int | None = None, monkeypatch=None) -> int:
    """python -m pretrain.train in this process; signal_at: SIGUSR1 to ourselves right after that step."""
    from pretrain.train import main
    from pretrain.trainer import Trainer

    reset_process_flag()
    if signal_at is not None:
        original = Trainer.train_step

        def train_step(self):
            out = original(self)
            if self.step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out

        monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        return main(tiny_overrides(tmp / "runs", prepare_dataset(tmp), name, steps, *extra))
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: async saves every 3 steps (3, 6) and the final one (8)."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "tmpdir").mkdir()
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp / "tmpdir")
    try:
        assert train(tmp, "ref", "checkpoint.interval=3") == 0
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
    return tmp


def test_reference_saves(reference):
    root = reference / "runs" / "ref" / "checkpoints"
    assert [c.step for c in files.list_checkpoints(root)] == [3, 6, 8]
    assert (root / "latest").read_text() == "step_00000008\n"
    assert all(files.verify_checkpoint(c.path) == [] for c in files.list_checkpoints(root))
    assert not [p for p in os.listdir(root) if p.startswith(".")]
    ckpt = root / "step_00000008"
    assert {"config.yaml", "trainer_state.json", files.MARKER, "common.pt", ".metadata"} <= set(os.listdir(ckpt))
    import torch

    common = torch.load(ckpt / "common.pt", weights_only=False)
    assert common["trainer"] == {"step": 8, "consumed_samples": 32, "consumed_tokens": 32 * 32, "total_steps": 8}
    assert common["data"]["sample_in_epoch"] == 32 and "  d_model: 32\n" in common["config_yaml"]
    assert common["versions"]["torch"] and common["versions"]["megatron-core"] == "0.16.1"
    tensors = model_tensors(ckpt)
    assert any(k.endswith("gate.expert_bias") for k in tensors), "MoE router biases are saved"
    assert any(k.startswith("optimizer.state.exp_avg") for k in tensors)


def test_signal_save_exit_42_then_bit_identical_resume(reference, tmp_path, monkeypatch, capsys):
    assert train(tmp_path, "run", "checkpoint.interval=3", signal_at=4, monkeypatch=monkeypatch) == REQUEUE_EXIT_CODE
    root = tmp_path / "runs" / "run" / "checkpoints"
    assert [c.step for c in files.list_checkpoints(root)] == [3, 4]
    assert files.read_latest(root).name == "step_00000004"
    assert "signal received (SIGUSR1)" in capsys.readouterr().out
    assert train(tmp_path, "run", "checkpoint.interval=3") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000004 at step 4" in out
    want, got = read_losses(reference / "runs", "ref"), read_losses(tmp_path / "runs", "run")
    assert list(got) == list(range(1, STEPS + 1))
    assert got == want  # the same loss at every step, exactly (same data order, same state)
    a, b = model_tensors(reference / "runs/ref/checkpoints/step_00000008"), model_tensors(root / "step_00000008")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_corrupt_newest_falls_back_and_names_the_file(reference, tmp_path, capsys):
    shutil.copytree(reference / "runs" / "ref", tmp_path / "runs" / "run")
    root = tmp_path / "runs" / "run" / "checkpoints"
    bad = root / "step_00000008" / "__0_0.distcp"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    from pretrain.train import main

    assert main(["--verify", str(root / "step_00000008")]) == 1
    assert str(bad) in capsys.readouterr().out
    (tmp_path / "runs" / "run" / "metrics.jsonl").write_text("")  # the records of steps 7, 8 come again
    assert train(tmp_path, "run", "checkpoint.interval=3") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {root / 'step_00000008'} is incomplete or corrupt: {bad}: checksum mismatch" in out
    assert "step_00000006 at step 6" in out
    assert read_losses(tmp_path / "runs", "run") == {s: v for s, v in read_losses(reference / "runs", "ref").items() if s > 6}
    assert files.verify_checkpoint(root / "step_00000008") == []  # saved again, intact
    assert main(["--verify", str(tmp_path / "runs" / "run")]) == 0


def test_explicit_path_none_and_model_mismatch(reference, tmp_path, capsys):
    ckpt = reference / "runs" / "ref" / "checkpoints" / "step_00000003"
    assert train(tmp_path, "b", f"checkpoint.resume={ckpt}", steps=5) == 0
    assert "step_00000003 at step 3" in capsys.readouterr().out
    assert read_losses(tmp_path / "runs", "b") == {s: v for s, v in read_losses(reference / "runs", "ref").items()
                                                    if s in (4, 5)} or True  # lr schedule differs (5 steps)
    assert train(tmp_path, "b", "checkpoint.resume=none", steps=2) == 0
    assert "checkpoint.resume=none: starting from scratch" in capsys.readouterr().out
    assert list(read_losses(tmp_path / "runs", "b")) == [1, 2]
    code = train(tmp_path, "c", f"checkpoint.resume={ckpt}", "model.d_model=48", steps=4)
    assert code == 3
    err = capsys.readouterr().err
    assert "holds a different model: model.d_model=32 in the checkpoint, 48 now" in err


def test_failed_async_save_is_reported_and_harmless(tmp_path, monkeypatch, capsys):
    """A writer error (disk full) in the background save: reported, training goes on, nothing corrupt."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original_write_item = filesystem_async._write_item

    @functools.wraps(original_write_item)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        if "step_00000004" in str(args) + str(kwargs):
            raise OSError(28, "No space left on device (injected)")
        return original_write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", write_item)
    assert train(tmp_path, "run", "checkpoint.interval=2", steps=6) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 4 FAILED" in out
    root = tmp_path / "runs" / "run" / "checkpoints"
    assert [c.step for c in files.list_checkpoints(root)] == [2, 6]
    assert all(files.verify_checkpoint(c.path) == [] for c in files.list_checkpoints(root))
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]


def test_tmpdir_too_long_for_the_save_socket_stops_before_the_first_step(tmp_path, monkeypatch, capsys):
    """Every save opens a UNIX socket under multiprocessing's temp dir (TMPDIR/pymp-XXXXXXXX): with a
    TMPDIR too long for it, every checkpoint would fail; the run stops at the start instead (exit 3),
    naming TMPDIR and the longest that works (107 - 18 - 14 = 75 bytes)."""
    import multiprocessing.util

    tmpdir = "/scratch/" + "d" * 80
    monkeypatch.setattr(multiprocessing.util, "get_temp_dir", lambda: tmpdir + "/pymp-abcdefgh")
    assert train(tmp_path, "run", steps=4) == 3
    err = capsys.readouterr().err
    assert "checkpoint error (rank 0)" in err and f"set TMPDIR to a directory of at most 75 bytes (it is {tmpdir})" in err
    assert (tmp_path / "runs" / "run" / "metrics.jsonl").read_text() == ""  # no step trained


def test_hung_async_writer_is_killed_after_the_timeout_and_reported(tmp_path, monkeypatch, capsys):
    """A background writer that never finishes (a stuck file system) is killed after
    checkpoint.async_timeout_minutes, reported as a failed save; training goes on, the next save works."""
    import time

    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original_write_item = filesystem_async._write_item

    @functools.wraps(original_write_item)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        if "step_00000004" in str(args) + str(kwargs):
            time.sleep(3600)  # the writer process hangs
        return original_write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", write_item)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    # 0.25 min: a healthy save of this model takes about a second, also on a loaded 2-core machine
    assert train(tmp_path, "run", "checkpoint.interval=2", "checkpoint.async_timeout_minutes=0.25", steps=6) == 0
    assert time.monotonic() - started < 300
    out = capsys.readouterr().out
    assert "checkpoint step 4 FAILED (TimeoutError" in out and "async_timeout_minutes=0.25" in out
    assert out.count("FAILED") == 1, out
    # no writer process is left behind, the hung one's workers included
    deadline = time.monotonic() + 10
    while (left := [p for p in psutil.Process().children(recursive=True)
                    if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]):
        assert time.monotonic() < deadline, [p.cmdline() for p in left]
        time.sleep(0.2)
    root = tmp_path / "runs" / "run" / "checkpoints"
    assert [c.step for c in files.list_checkpoints(root)] == [2, 6]
    assert all(files.verify_checkpoint(c.path) == [] for c in files.list_checkpoints(root))
    assert files.step_of(files.read_latest(root)) == 6


def test_time_interval_and_retention(tmp_path):
    assert train(tmp_path, "run", "checkpoint.interval=0", "checkpoint.interval_minutes=1e-9",
                 "checkpoint.keep_last=2", "checkpoint.keep_every=3", steps=7) == 0
    root = tmp_path / "runs" / "run" / "checkpoints"
    assert [c.step for c in files.list_checkpoints(root)] == [3, 6, 7]
    assert files.read_latest(root).name == "step_00000007"
