"""Synthetic packed datasets (random tokens, random document lengths) in the prepared format.

For benchmarks and tests that need a dataset of any vocabulary and sequence length without text:
the shards have the same columns and prepare_meta.json as `python -m data.prepare` output, so the
training loader reads them unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from data.prepare import FORMAT, FORMAT_VERSION, META_FILE, token_dtype


def random_doc_starts(rng: np.random.Generator, seq_len: int, mean_doc_len: int) -> np.ndarray:
    """uint32 start positions of the documents of one sample: 0, then a Poisson number (mean
    seq_len / mean_doc_len) of distinct uniform positions in [1, seq_len)."""
    num_starts = rng.poisson(seq_len / max(1, mean_doc_len))
    starts = np.unique(rng.integers(1, seq_len, num_starts)) if num_starts else np.zeros(0, np.int64)
    return np.concatenate([[0], starts]).astype(np.uint32)


def write_synthetic(out: str | os.PathLike, *, seq_len: int, vocab_size: int, num_samples: int,
                    mean_doc_len: int = 2048, seed: int = 0, shard_size_limit: int | str = "256mb") -> Path:
    """Write `num_samples` samples of seq_len + 1 uniform random tokens; documents start at
    positions drawn with mean spacing `mean_doc_len`. Returns the output directory."""
    from streaming import MDSWriter

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    sample_len = seq_len + 1
    columns = {"tokens": f"ndarray:{dtype.name}:{sample_len}", "doc_starts": "ndarray:uint32"}
    with MDSWriter(out=str(out), columns=columns, size_limit=shard_size_limit) as writer:
        for _ in range(num_samples):
            tokens = rng.integers(0, vocab_size, sample_len).astype(dtype)
            writer.write({"tokens": tokens, "doc_starts": random_doc_starts(rng, seq_len, mean_doc_len)})
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, seq_len=seq_len, sample_len=sample_len,
                tokenizer=f"synthetic-{vocab_size}", vocab_size=vocab_size, eos_id=vocab_size - 1,
                token_dtype=dtype.name, columns=columns, num_samples=num_samples,
                num_tokens=num_samples * sample_len, synthetic_seed=seed)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
