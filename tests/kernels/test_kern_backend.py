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


def test_deterministic_switches_autotuned_kernels_to_their_first_config(monkeypatch):
    """On CUDA an autotuned launcher holds the tuned kernel (every config) and a fixed one (the
    first config); kernels.deterministic picks the fixed one at each launch."""
    import triton
    import triton.language as tl

    from kernels import _triton_utils

    @triton.jit
    def _kernel(x_ptr, n, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    monkeypatch.setattr(_triton_utils, "AUTOTUNE", True)
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 128, 256)]
    launcher = _triton_utils.autotune(configs, key=["n"])(_kernel)
    assert [c.kwargs["BLOCK"] for c in launcher.tuned.configs] == [64, 128, 256]
    assert [c.kwargs["BLOCK"] for c in launcher.fixed.configs] == [64]
    per_chunk = _triton_utils.autotune_per_chunk(_kernel, configs, key=["n"], chunk_params=("BLOCK",))(128)
    assert [c.kwargs["BLOCK"] for c in per_chunk.tuned.configs] == [64, 128]  # 256 clamped to the chunk
    assert [c.kwargs["BLOCK"] for c in per_chunk.fixed.configs] == [64]

    pick = _triton_utils._Launcher(tuned={"grid": "tuned"}, fixed={"grid": "fixed"})
    try:
        backend.set_deterministic(True)
        assert backend.get_deterministic() and pick["grid"] == "fixed"
        backend.set_deterministic(False)
        assert pick["grid"] == "tuned"
    finally:
        backend.set_deterministic(False)


def test_interpreter_and_autotune_off_use_one_config(monkeypatch):
    import triton
    import triton.language as tl

    from kernels import _triton_utils

    @triton.jit
    def _kernel(x_ptr, n, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 128)]
    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    monkeypatch.setattr(_triton_utils, "AUTOTUNE", False)
    launcher = _triton_utils.autotune(configs, key=["n"])(_kernel)
    assert launcher.tuned is launcher.fixed and len(launcher.fixed.configs) == 1
    monkeypatch.setattr(_triton_utils, "INTERPRET", True)
    monkeypatch.setattr(_triton_utils, "AUTOTUNE", True)
    launcher = _triton_utils.autotune(configs, key=["n"], interpret_config=configs[1])(_kernel)
    assert launcher.tuned is launcher.fixed and launcher.fixed.configs[0].kwargs["BLOCK"] == 128


def test_trainer_applies_the_kernels_config():
    from pretrain.config import load_config
    from pretrain.trainer import configure_kernels

    old = backend.get_backend()
    try:
        configure_kernels(load_config(["configs/demo.yaml"], ["kernels.backend=torch", "kernels.deterministic=true"]))
        assert backend.get_backend() == "torch" and backend.get_deterministic()
        configure_kernels(load_config(["configs/demo.yaml"], []))
        assert backend.get_backend() == "triton" and not backend.get_deterministic()
    finally:
        backend.set_backend(old)
        backend.set_deterministic(False)


def test_triton_ssd_refuses_a_launch_past_the_cuda_grid_limit():
    """batch * nchunks programs share one CUDA grid axis (limit 65535): past it the Triton SSD scan
    raises before launching anything, naming the numbers, instead of a CUDA launch error."""
    from kernels.ssd.triton_op import ssd_scan

    seqlen = 16 * 65536  # 65536 chunks of 16: one over the limit, with one head of width one
    x = torch.zeros(1, seqlen, 1, 1)
    dt, A = torch.zeros(1, seqlen, 1), -torch.ones(1)
    B = C = torch.zeros(1, seqlen, 1, 1)
    with pytest.raises(ValueError, match=r"1 \* 65536 = 65536 programs .* limit of 65535"):
        ssd_scan(x, dt, A, B, C, chunk_size=16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        ssd_scan(x[:, :64], dt[:, :64], A, B[:, :64], C[:, :64], chunk_size=24)
