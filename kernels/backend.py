"""Kernel backend selection: which implementation the public ops in kernels/*/op.py run.

Owns: the process-wide backend name ("triton" or "torch"), the deterministic-backward flag,
and `use_triton(*tensors)`, the one predicate every op.py dispatches on.

- "triton" (default): the Triton kernels run when every tensor is on CUDA, or on CPU when
  TRITON_INTERPRET=1 is set (the interpreter; float32 only) and Triton imports. Otherwise the
  pure-PyTorch reference runs, so a CPU host without the interpreter just works.
- "torch": always the pure-PyTorch reference (the spec).

Kernels never import torch.distributed; this module imports os, torch, and triton once (whether it
imports at all decides if the Triton kernels can run).
"""

from __future__ import annotations

import os

import torch

_BACKENDS = ("triton", "torch")
_backend = "triton"
_deterministic = False


def set_backend(name: str) -> None:
    """Select the backend for all kernel ops: "triton" or "torch"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernels backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The current backend name ("triton" or "torch")."""
    return _backend


def set_deterministic(flag: bool) -> None:
    """Ask for bitwise reproducible kernels, run to run and node to node (`kernels.deterministic`).

    Every Triton backward in kernels/ is deterministic for a given launch config by construction
    (no atomics: each output element has one writer, and partial sums over heads, positions or
    row blocks are reduced by torch in a fixed order; tests/kernels/test_kern_gpu.py checks it).
    What the flag changes: the autotuned kernels take their first config instead of the one a
    timing benchmark picks (kernels/_triton_utils.autotune), because tile sizes set the summation
    order and the benchmark's pick can differ between nodes and runs. A future kernel that uses
    atomics must honour it too.
    """
    global _deterministic
    _deterministic = bool(flag)


def get_deterministic() -> bool:
    return _deterministic


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 is set in the environment (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


_TRITON_IMPORTABLE = _import_triton()  # once at import: torch.compile then reads a constant


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def use_triton(*tensors) -> bool:
    """True iff the backend is "triton" and the Triton kernels can run on these tensors.

    `tensors` may contain None (optional arguments); those are ignored. All given tensors must
    be CUDA tensors, or TRITON_INTERPRET=1 must be set and Triton importable (then the
    interpreter runs the kernels on CPU tensors).
    """
    if _backend != "triton":
        return False
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if ts and all(t.is_cuda for t in ts):
        return triton_importable()
    return interpreter_enabled() and triton_importable() and all(not t.is_cuda for t in ts)


def triton_dtype_ok(x: torch.Tensor) -> bool:
    """The kernels take bf16/fp16/fp32 on CUDA; the CPU interpreter is right for float32 only
    (its bfloat16 is wrong), so other dtypes there use the reference."""
    if x.is_cuda:
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return x.dtype == torch.float32
