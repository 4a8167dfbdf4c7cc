"""mamba_inner op package: reference.py (spec), op.py (dispatching entry point), triton_op.py (one fused custom op)."""
