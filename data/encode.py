"""Tokenize documents into id arrays (EOS appended), in order, in this process or in worker processes.

    for ids in encoded_documents(tok, iter_documents(files), workers=4, on_read=bar.update, counts=counts):
        ...                                   # np.ndarray of token ids, the document's EOS last

Documents are grouped into batches of about `batch_bytes` characters; with workers > 1 the batches are
tokenized by a pool of spawned processes (each loads the tokenizer from its spec once) and their results
are consumed strictly in submission order, with at most 2 x workers batches in flight (memory stays
bounded on any corpus size). The output is therefore identical for every number of workers.
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

_worker_tok: Tokenizer | None = None


def encode_texts(tok: Tokenizer, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
    """Each text's ids followed by EOS, as `dtype` (checked to fit the tokenizer's vocab_size)."""
    if isinstance(tok, ByteTokenizer):
        out = []
        for text in texts:
            ids = np.frombuffer(tok.encode_bytes(text) + b"\0", dtype=np.uint8).astype(dtype)
            ids[-1] = tok.eos_id
            out.append(ids)
        return out
    out = []
    for ids in tok.encode_batch(list(texts)):
        ids = np.asarray(ids + [tok.eos_id], dtype=np.int64)
        if ids.max() >= tok.vocab_size:  # would wrap around in a narrow column
            raise ValueError(f"tokenizer {tok.spec} produced id {ids.max()} >= its vocab_size {tok.vocab_size}")
        out.append(ids.astype(dtype))
    return out


def _init_worker(spec: str, eos_token: str | None) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(spec, eos_token)


def _encode_in_worker(texts: list[str], dtype: str) -> list[np.ndarray]:
    return encode_texts(_worker_tok, texts, np.dtype(dtype))


def _batches(docs: Iterable[tuple[str, int]], on_read: Callable[[int], None], counts: dict,
             batch_bytes: int, batch_docs: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text, nbytes in docs:
        on_read(nbytes)
        if not text:
            counts["num_empty_documents"] = counts.get("num_empty_documents", 0) + 1
            continue
        batch.append(text)
        size += len(text)
        if size >= batch_bytes or len(batch) >= batch_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded_documents(tok: Tokenizer, docs: Iterable[tuple[str, int]], dtype: np.dtype, *, workers: int = 1,
                      eos_token: str | None = None, on_read: Callable[[int], None] = lambda n: None,
                      counts: dict | None = None, batch_bytes: int = 1 << 20,
                      batch_docs: int = 1024) -> Iterator[np.ndarray]:
    """Yield every non-empty document of `docs` ((text, nbytes) pairs) as ids + EOS; counts empty ones."""
    counts = {} if counts is None else counts
    batches = _batches(docs, on_read, counts, batch_bytes, batch_docs)
    if workers <= 1:
        for batch in batches:
            yield from encode_texts(tok, batch, dtype)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.spec, eos_token)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch, dtype.name)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
