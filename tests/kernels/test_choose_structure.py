"""kernels._triton_utils.choose_structure: the faster of two ways, timed once per key on CUDA; the
default elsewhere and under kernels.deterministic. The timer is replaced by a fake with set times
(no GPU here), so what is checked is the choosing and remembering, not CUDA events."""
from __future__ import annotations

import pytest
import torch
import triton.testing

import kernels
from kernels import _triton_utils as tu


@pytest.fixture
def timer(monkeypatch):
    calls = []
    times = {"a": 2.0, "b": 1.0}

    def fake_do_bench(fn, warmup, rep):
        calls.append(fn())
        return times[calls[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(tu, "INTERPRET", False)
    monkeypatch.setattr(tu, "AUTOTUNE", True)
    monkeypatch.setattr(tu, "_structures", {})
    return calls


LABELS = ("a", "b")


def run(label):
    return label


def default():
    return "a"
CUDA = torch.device("cuda", 0)


def test_cuda_times_each_option_once_per_key_and_takes_the_fastest(timer):
    assert tu.choose_structure("op", (1, 2), LABELS, run, default, CUDA) == "b"
    assert timer == ["a", "b"]
    assert tu.choose_structure("op", (1, 2), LABELS, run, default, CUDA) == "b"  # remembered: not timed again
    assert timer == ["a", "b"]
    assert tu.choose_structure("op", (3, 4), LABELS, run, default, CUDA) == "b"  # another key is timed
    assert timer == ["a", "b", "a", "b"]


def test_default_off_cuda_and_under_deterministic(timer):
    assert tu.choose_structure("op", (1,), LABELS, run, default, torch.device("cpu")) == "a"
    kernels.set_deterministic(True)
    try:
        assert tu.choose_structure("op", (1,), LABELS, run, default, CUDA) == "a"
    finally:
        kernels.set_deterministic(False)
    assert timer == []


def test_hot_path_calls_neither_run_nor_default_once_timed(timer):
    counted = []

    def counting_default():
        counted.append("default")
        return "a"

    tu.choose_structure("op", (5,), LABELS, run, counting_default, CUDA)
    timer.clear()
    assert tu.choose_structure("op", (5,), LABELS, run, counting_default, CUDA) == "b"
    assert timer == [] and counted == []


def test_ssd_head_split_candidates_never_exceed_the_default():
    """The SSD backward times the default split of a group's heads and the powers of two below it
    that divide them (fewer partial sums, never more memory than the default)."""
    from kernels.ssd import triton_bwd as bwd

    if tu.INTERPRET:
        pytest.skip("the interpreter's default split is 2 for even head counts")
    assert [bwd._nsplit(h) for h in (64, 32, 16, 12, 7)] == [8, 4, 2, 1, 1]
    assert bwd.split_candidates(64) == (1, 2, 4, 8)
    assert bwd.split_candidates(32) == (1, 2, 4)
    assert bwd.split_candidates(16) == (1, 2)
    assert bwd.split_candidates(12) == (1,)
    assert bwd.split_candidates(7) == (1,)
