"""cross_entropy op package: reference.py (spec), op.py (dispatching entry point), Triton kernel."""
