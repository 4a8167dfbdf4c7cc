"""CPU stand-ins for megatron-core's pipeline schedules, installed only without CUDA (the companion of
parallel/cpu_compat.py, kept apart so that pipeline parallelism adds its needs in one place).

- megatron.core.pipeline_parallel.schedules creates its token counter with a hard-coded
  `torch.zeros([], dtype=torch.int, device="cuda")`; the module sees a `torch` whose tensor
  factories map device "cuda" to the CPU (every other attribute is torch's).
The p2p buffers use torch.cuda.current_device(), already a CPU stand-in in parallel/cpu_compat.py,
and `batch_p2p_sync` is off on the CPU (parallel.common.megatron_config).
"""
from __future__ import annotations

import torch

PATCHED = ("megatron.core.pipeline_parallel.schedules.torch",)

_installed = False


def install() -> bool:
    """Install the stand-ins when CUDA is unavailable (idempotent). Returns whether they are active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core.pipeline_parallel import schedules

    from parallel.cpu_compat import _CpuFactoriesTorch

    schedules.torch = _CpuFactoriesTorch()
    _installed = True
    return True


def installed() -> bool:
    return _installed
