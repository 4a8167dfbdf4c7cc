"""kernels._triton_utils.skipping_failed_compiles: a config whose compilation fails in a Triton MLIR
pass is timed as infinitely slow (the autotuner moves on to the others) with a warning naming the
kernel; every other error still ends the run. The real benchmark (CUDA events) is replaced by a
stand-in that calls the kernel, so what is checked here is the error handling, not timing."""
from __future__ import annotations

import pytest

from kernels import _triton_utils
from kernels._triton_utils import skipping_failed_compiles


@pytest.fixture
def benchmarker(monkeypatch):
    def fake(kernel_call, quantiles):
        kernel_call()
        return [1.0] * len(quantiles)

    monkeypatch.setattr(_triton_utils, "_benchmarker", lambda: fake)


def test_a_pass_manager_failure_is_skipped_with_a_warning(benchmarker):
    def failing():
        raise RuntimeError("PassManager::run failed")

    with pytest.warns(UserWarning, match="_chunk_dcb_kernel: a config failed to compile"):
        assert skipping_failed_compiles("_chunk_dcb_kernel")(failing, (0.5, 0.2, 0.8)) == [float("inf")] * 3


def test_a_working_config_is_timed(benchmarker):
    assert skipping_failed_compiles("k")(lambda: None, (0.5, 0.2, 0.8)) == [1.0] * 3


def test_other_errors_still_end_the_run(benchmarker):
    def failing():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        skipping_failed_compiles("k")(failing, (0.5,))
