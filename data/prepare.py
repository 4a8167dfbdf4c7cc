"""Tokenize raw text and pack it into fixed-length samples in mosaicml-streaming MDS shards.

    python -m data.prepare --input corpus/ more/*.jsonl --tokenizer tokenizer.json --out data/mds --seq-len 2048

Inputs: files, directories (searched recursively for .txt and .jsonl) and globs (every file they match).
A .jsonl file holds one document per line (the `--text-field` string of each JSON object); any other file
is one plain-text document. Files are read in sorted path order, so the output is deterministic.

Every document is tokenized and followed by EOS; the token stream is cut into samples of seq_len + 1
tokens (inputs are sample[:-1], labels sample[1:]). A document may run across a sample boundary; its
remainder is simply the first document of the next sample. The tail that does not fill a sample is dropped.

MDS columns per sample:
    tokens      ndarray (seq_len + 1,), uint16 when the vocabulary fits, else uint32
    doc_starts  ndarray (k,) uint32: 0 (the sample's first, possibly continued, document), then every
                position p in 1..seq_len where a new document starts (the token at p follows an EOS);
                data.dataset turns them into seq_idx.
The output directory also holds prepare_meta.json (see `prepare`); it is written last, and the directory
appears under its final name only when complete (written as a hidden sibling, then renamed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

META_FILE = "prepare_meta.json"
FORMAT = "hybrid-pretrain/packed-mds"
FORMAT_VERSION = 1
SEARCHED_SUFFIXES = (".txt", ".jsonl")  # what directories are searched for
_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------------------------- inputs
def find_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: set[Path] = set()
    for item in inputs:
        item = os.path.expanduser(str(item))
        if _GLOB_CHARS & set(item):
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            found = [m for m in matches if m.is_file()]
            if not found:
                raise FileNotFoundError(f"--input {item!r} matches no files")
        elif os.path.isdir(item):
            found = [p for p in Path(item).rglob("*") if p.is_file() and p.suffix in SEARCHED_SUFFIXES
                     and not any(part.startswith(".") for part in p.relative_to(item).parts)]
            if not found:
                raise FileNotFoundError(f"--input directory {item} holds no {'/'.join(SEARCHED_SUFFIXES)} files")
        elif os.path.isfile(item):
            found = [Path(item)]
        else:
            raise FileNotFoundError(f"--input {item} does not exist")
        files.update(p.resolve() for p in found)
    if not files:
        raise ValueError("no input files given (--input)")
    return sorted(files, key=str)


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[tuple[str, int]]:
    """Yield (text, bytes_read) per document. Undecodable bytes become U+FFFD rather than stopping a long run."""
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        yield "", len(line)
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as err:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{line_no}: no string field {text_field!r} "
                                         "(choose the field with --text-field)")
                    yield text, len(line)
        else:
            raw = path.read_bytes()
            yield raw.decode("utf-8", errors="replace"), len(raw)


# ----------------------------------------------------------------------------------------------- packing
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class Packer:
    """Concatenate documents and cut the stream into samples of `sample_len` tokens with document starts."""

    def __init__(self, sample_len: int, dtype: np.dtype):
        self.sample_len = sample_len
        self.dtype = dtype
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # stream offsets (relative to the buffer) where documents start
        self._size = 0

    def add(self, doc: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append one document (its EOS included); yield every sample that is now complete."""
        self._starts.append(self._size)
        self._chunks.append(doc.astype(self.dtype, copy=False))
        self._size += len(doc)
        if self._size < self.sample_len:
            return
        buf = np.concatenate(self._chunks)
        starts = np.asarray(self._starts, dtype=np.int64)
        n = len(buf) // self.sample_len
        for i in range(n):
            lo = i * self.sample_len
            a, b = np.searchsorted(starts, [lo + 1, lo + self.sample_len])
            doc_starts = np.concatenate([[0], starts[a:b] - lo]).astype(np.uint32)
            yield buf[lo:lo + self.sample_len], doc_starts
        cut = n * self.sample_len
        self._chunks = [buf[cut:]]
        self._starts = [int(s) - cut for s in starts if s >= cut]
        self._size = len(buf) - cut

    @property
    def leftover(self) -> int:
        """Tokens buffered that do not fill a sample (dropped at the end)."""
        return self._size


# ----------------------------------------------------------------------------------------------- prepare
def prepare(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | Tokenizer,
    out: str | os.PathLike,
    seq_len: int,
    *,
    text_field: str = "text",
    max_tokens: int | None = None,
    shard_size_limit: int | str = "64mb",
    compression: str | None = None,
    eos_token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    input_files: Sequence[Path] | None = None,
) -> dict:
    """Tokenize, pack and write MDS shards plus prepare_meta.json to `out`; return the summary (= meta).

    `max_tokens` caps the token stream (EOS included; the document at the cap is cut). `input_files`
    skips the input search and reads exactly these files (used by the demo for its .py sources).
    Meta fields: format, format_version, seq_len, sample_len, tokenizer (spec), vocab_size, eos_id,
    eos_token (None for bytes), token_dtype, columns, text_field, max_tokens, num_input_files,
    num_documents, num_empty_documents, num_tokens (in samples), num_tokens_dropped (the tail),
    num_samples, num_shards, compression. The summary adds out and seconds.
    """
    from streaming import MDSWriter
    from tqdm import tqdm

    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len + 1:
        raise ValueError(f"--max-tokens {max_tokens} is smaller than one sample (seq_len + 1 = {seq_len + 1})")
    tok = load_tokenizer(tokenizer, eos_token) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    files = [Path(f) for f in input_files] if input_files is not None else find_inputs(inputs)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")

    dtype = token_dtype(tok.vocab_size)
    sample_len = seq_len + 1
    columns = {"tokens": f"ndarray:{dtype.name}:{sample_len}", "doc_starts": "ndarray:uint32"}
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)

    counts = dict(num_documents=0, num_empty_documents=0, num_samples=0)
    stream_tokens = 0
    packer = Packer(sample_len, dtype)
    start = time.time()
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    try:
        with MDSWriter(out=str(partial), columns=columns, compression=compression,
                       size_limit=shard_size_limit) as writer:
            for doc in _tokenized_documents(tok, files, text_field, bar, counts):
                if max_tokens is not None and stream_tokens + len(doc) > max_tokens:
                    doc = doc[:max_tokens - stream_tokens]
                stream_tokens += len(doc)
                counts["num_documents"] += 1
                for tokens, doc_starts in packer.add(doc):
                    writer.write({"tokens": tokens, "doc_starts": doc_starts})
                    counts["num_samples"] += 1
                if max_tokens is not None and stream_tokens >= max_tokens:
                    break
        bar.close()
        if counts["num_samples"] == 0:
            raise ValueError(f"the inputs hold {stream_tokens} tokens, fewer than one sample of "
                             f"seq_len + 1 = {sample_len} tokens")
        num_shards = len(json.loads((partial / "index.json").read_text())["shards"])
        meta = dict(
            format=FORMAT, format_version=FORMAT_VERSION, seq_len=seq_len, sample_len=sample_len,
            tokenizer=tok.spec, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
            eos_token=getattr(tok, "eos_token", None), token_dtype=dtype.name,
            columns=columns, text_field=text_field, max_tokens=max_tokens, num_input_files=len(files),
            num_documents=counts["num_documents"], num_empty_documents=counts["num_empty_documents"],
            num_tokens=counts["num_samples"] * sample_len, num_tokens_dropped=packer.leftover,
            num_samples=counts["num_samples"], num_shards=num_shards, compression=compression,
        )
        (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(partial, out)
    finally:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
    return dict(meta, out=str(out), seconds=round(time.time() - start, 2))


def _remove_dead_partials(out: Path) -> None:
    """Delete .<out>.partial-<pid> directories left by killed prepares (their process is gone)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists():
            shutil.rmtree(path, ignore_errors=True)


def _tokenized_documents(tok: Tokenizer, files, text_field, bar, counts, batch_bytes=1 << 20):
    """Yield each non-empty document as an ndarray of ids with EOS appended (batched for HF tokenizers)."""
    eos = np.array([tok.eos_id], dtype=np.int64)
    if isinstance(tok, ByteTokenizer):
        eos8 = bytes([0])
        for text, nbytes in iter_documents(files, text_field):
            bar.update(nbytes)
            if not text:
                counts["num_empty_documents"] += 1
                continue
            ids = np.frombuffer(tok.encode_bytes(text) + eos8, dtype=np.uint8).astype(np.uint16)
            ids[-1] = tok.eos_id
            yield ids
        return
    batch: list[str] = []
    size = 0

    def flush():
        for ids in tok.encode_batch(batch):
            ids = np.concatenate([np.asarray(ids, dtype=np.int64), eos])
            if ids.max() >= tok.vocab_size:  # would wrap around in the uint16 column
                raise ValueError(f"tokenizer {tok.spec} produced id {ids.max()} >= its vocab_size {tok.vocab_size}")
            yield ids

    for text, nbytes in iter_documents(files, text_field):
        bar.update(nbytes)
        if not text:
            counts["num_empty_documents"] += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= batch_bytes or len(batch) >= 1024:
            yield from flush()
            batch, size = [], 0
    yield from flush()


def read_meta(path: str | os.PathLike) -> dict | None:
    """prepare_meta.json of a prepared directory, or None when absent."""
    meta = Path(path) / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, action="extend",
                   help="files, directories (searched for .txt/.jsonl) or globs")
    p.add_argument("--tokenizer", required=True, help="path to a Hugging Face tokenizer.json, or 'bytes'")
    p.add_argument("--out", required=True, help="output directory (MDS shards + prepare_meta.json)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--shard-size-limit", default="64mb", help="MDS shard size limit, e.g. 64mb or 67108864")
    p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd or zstd:7")
    p.add_argument("--eos-token", default=None, help="end-of-document token when it cannot be detected")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    limit = int(args.shard_size_limit) if args.shard_size_limit.isdigit() else args.shard_size_limit
    try:
        summary = prepare(args.input, args.tokenizer, args.out, args.seq_len, text_field=args.text_field,
                          max_tokens=args.max_tokens, shard_size_limit=limit, compression=args.compression,
                          eos_token=args.eos_token, overwrite=args.overwrite, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        p.exit(2, f"error: {err}\n")
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    return (f"prepared {s['num_documents']:,} documents from {s['num_input_files']:,} files: "
            f"{s['num_tokens']:,} tokens in {s['num_samples']:,} samples of {s['sample_len']} tokens "
            f"(seq_len {s['seq_len']}), {s['num_shards']} shards, {s['num_tokens_dropped']:,} tail tokens "
            f"dropped, vocab {s['vocab_size']} (eos {s['eos_id']}) -> {s['out']} [{s['seconds']:.1f}s]")


if __name__ == "__main__":
    main()
