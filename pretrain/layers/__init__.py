"""Single-process layer modules of the hybrid model (one file per sublayer kind)."""
