"""kernels.backend: selection, validation, and dispatch falling back to the reference."""

import os

import pytest
import torch

import kernels
from kernels import backend


def test_set_get_and_bad_name():
    old = backend.get_backend()
    try:
        backend.set_backend("torch")
        assert backend.get_backend() == "torch"
        assert not backend.use_triton(torch.zeros(1))
        with pytest.raises(ValueError, match="'cuda'"):
            backend.set_backend("cuda")
    finally:
        backend.set_backend(old)


def test_default_is_triton():
    import subprocess
    import sys

    code = "import kernels.backend as b; print(b.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "triton"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the no-interpreter fallback")
def test_cpu_without_interpreter_uses_reference():
    # the backend is process state: an earlier in-process training run may have set "torch"
    previous = backend.get_backend()
    backend.set_backend("triton")
    try:
        _check_reference_dispatch()
    finally:
        backend.set_backend(previous)


def _check_reference_dispatch():
    assert backend.get_backend() == "triton"
    assert not backend.use_triton(torch.zeros(2))
    x = torch.randn(1, 9, 2, 3)
    dt, A = torch.randn(1, 9, 2), -torch.rand(2)
    B, C = torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4)
    from kernels.ssd.reference import ssd_scan as ref

    torch.testing.assert_close(kernels.ssd_scan(x, dt, A, B, C, chunk_size=4), ref(x, dt, A, B, C, chunk_size=4))
    w = torch.randn(3, 4)
    xc = torch.randn(2, 7, 3)
    from kernels.conv1d.reference import causal_conv1d as cref

    torch.testing.assert_close(kernels.causal_conv1d(xc, w, activation="silu"), cref(xc, w, activation="silu"))
    y = torch.randn(2, 8)
    from kernels.rmsnorm_gated.reference import rmsnorm_gated as rref

    torch.testing.assert_close(kernels.rmsnorm_gated(y, y, torch.ones(8), group_size=4),
                               rref(y, y, torch.ones(8), group_size=4))


def test_deterministic_flag():
    backend.set_deterministic(True)
    assert backend.get_deterministic()
    backend.set_deterministic(False)
    assert not backend.get_deterministic()
