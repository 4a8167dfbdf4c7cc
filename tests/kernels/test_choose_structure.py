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


OPTIONS = {"a": lambda: "a", "b": lambda: "b"}
CUDA = torch.device("cuda", 0)


def test_cuda_times_each_option_once_per_key_and_takes_the_fastest(timer):
    assert tu.choose_structure("op", (1, 2), OPTIONS, "a", CUDA) == "b"
    assert timer == ["a", "b"]
    assert tu.choose_structure("op", (1, 2), OPTIONS, "a", CUDA) == "b"  # remembered: not timed again
    assert timer == ["a", "b"]
    assert tu.choose_structure("op", (3, 4), OPTIONS, "a", CUDA) == "b"  # another key is timed
    assert timer == ["a", "b", "a", "b"]


def test_default_off_cuda_and_under_deterministic(timer):
    assert tu.choose_structure("op", (1,), OPTIONS, "a", torch.device("cpu")) == "a"
    kernels.set_deterministic(True)
    try:
        assert tu.choose_structure("op", (1,), OPTIONS, "a", CUDA) == "a"
    finally:
        kernels.set_deterministic(False)
    assert timer == []
