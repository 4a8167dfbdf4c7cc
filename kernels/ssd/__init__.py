"""ssd op package: reference.py (spec), op.py (dispatching entry point), Triton kernels."""
