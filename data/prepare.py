"""Tokenize raw text and pack it into fixed-length samples in mosaicml-streaming MDS shards.

    python -m data.prepare --input corpus/ more/*.jsonl --tokenizer tokenizer.json --out data/mds --seq-len 2048
    python -m data.prepare --input 'web/*.parquet' --tokenizer tokenizer.json --out s3://bucket/web \
        --seq-len 2048 --workers 8 --compression zstd

Inputs (data.inputs): files, directories (searched recursively for .txt, .jsonl and .parquet) and globs.
A .jsonl file holds one document per line (the `--text-field` string of each JSON object), a .parquet file
one per row (the `--text-field` column); any other file is one plain-text document. Files are read in
sorted path order and tokenized in order (data.encode, `--workers` processes), so the output is
deterministic and the same for any number of workers.

Every document is tokenized and followed by EOS; the token stream is cut into samples of seq_len + 1
tokens (inputs are sample[:-1], labels sample[1:]). A document may run across a sample boundary; its
remainder is simply the first document of the next sample. The tail that does not fill a sample is dropped.

MDS columns per sample:
    tokens      ndarray (seq_len + 1,), uint16 when the vocabulary fits, else uint32
    doc_starts  ndarray (k,) uint32: 0 (the sample's first, possibly continued, document), then every
                position p in 1..seq_len where a new document starts (the token at p follows an EOS);
                data.dataset turns them into seq_idx.
The output also holds prepare_meta.json (see `prepare`, with per-shard statistics); it is written last.
A local output appears under its final name only when complete (written as a hidden sibling, then
renamed); a remote one first gets an "incomplete" meta, replaced by the real one after every shard is
uploaded, so an interrupted prepare never looks complete to a reader. Rerunning an interrupted prepare
redoes it; a completed one is an error unless --overwrite (redo) or --skip-existing (keep).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.encode import encoded_documents
from data.inputs import SEARCHED_SUFFIXES, find_inputs, iter_documents  # noqa: F401 (re-exported)
from data.tokenizer import Tokenizer, load_tokenizer

META_FILE = "prepare_meta.json"
FORMAT = "hybrid-pretrain/packed-mds"
FORMAT_VERSION = 1


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
def is_remote(out: str | os.PathLike) -> bool:
    """An object-store URL (s3://, gs://, ...) rather than a local path."""
    return "://" in str(out)


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
    skip_existing: bool = False,
    workers: int = 1,
    progress: bool = True,
    input_files: Sequence[Path] | None = None,
) -> dict:
    """Tokenize, pack and write MDS shards plus prepare_meta.json to `out`; return the summary (= meta).

    `out` is a local directory or an object-store URL (s3://bucket/prefix, gs://...: shards are staged in
    TMPDIR and uploaded as they are closed, by mosaicml-streaming's uploader; credentials and endpoint come
    from the usual environment, e.g. AWS_* and S3_ENDPOINT_URL). `workers` > 1 tokenizes in that many
    processes; the output is byte-identical for any number. `max_tokens` caps the token stream (EOS
    included; the document at the cap is cut). An existing complete output is an error, replaced with
    `overwrite`, or kept and its meta returned with `skip_existing`. `input_files` skips the input search
    and reads exactly these files (used by the demo for its .py sources).
    Meta fields: format, format_version, seq_len, sample_len, tokenizer (spec), vocab_size, eos_id,
    eos_token (None for bytes), token_dtype, columns, text_field, max_tokens, num_input_files,
    num_documents, num_empty_documents, num_tokens (in samples), num_tokens_dropped (the tail),
    num_samples, num_shards, compression, shards (per shard: basename, num_samples, num_tokens,
    num_documents (document starts), bytes (raw), zip_bytes). The summary adds out and seconds.
    """
    from streaming import MDSWriter
    from tqdm import tqdm

    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len + 1:
        raise ValueError(f"--max-tokens {max_tokens} is smaller than one sample (seq_len + 1 = {seq_len + 1})")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    remote = str(out).rstrip("/") if is_remote(out) else None
    out = remote or Path(out).expanduser().resolve()
    existing = _existing_meta(out)
    if existing is not None and skip_existing:
        return dict(existing, out=str(out), seconds=0.0, skipped=True)
    if existing is not None and not overwrite:
        raise FileExistsError(f"--out {out} holds a complete prepared dataset (pass --overwrite to replace it, "
                              "or --skip-existing to keep it)")
    if remote is None and out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    tok = load_tokenizer(tokenizer, eos_token) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    files = [Path(f) for f in input_files] if input_files is not None else find_inputs(inputs)

    dtype = token_dtype(tok.vocab_size)
    sample_len = seq_len + 1
    columns = {"tokens": f"ndarray:{dtype.name}:{sample_len}", "doc_starts": "ndarray:uint32"}
    if remote is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(out)
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        writer_out = str(partial)
    else:  # the remote meta is replaced by an "incomplete" marker first, so readers refuse a half-written copy
        partial = Path(tempfile.mkdtemp(prefix="prepare-staging-"))
        writer_out = (str(partial), remote)
        _upload_meta(partial, remote, {"format": "incomplete", "writer_pid": os.getpid()})

    documents = None
    counts = dict(num_documents=0, num_empty_documents=0, num_samples=0)
    docs_per_sample: list[int] = []
    stream_tokens = 0
    packer = Packer(sample_len, dtype)
    start = time.time()
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    try:
        documents = encoded_documents(tok, iter_documents(files, text_field), dtype, workers=workers,
                                      eos_token=eos_token, on_read=bar.update, counts=counts)
        with MDSWriter(out=writer_out, columns=columns, compression=compression,
                       size_limit=shard_size_limit, exist_ok=True) as writer:
            for doc in documents:
                if max_tokens is not None and stream_tokens + len(doc) > max_tokens:
                    doc = doc[:max_tokens - stream_tokens]
                stream_tokens += len(doc)
                counts["num_documents"] += 1
                for tokens, doc_starts in packer.add(doc):
                    writer.write({"tokens": tokens, "doc_starts": doc_starts})
                    docs_per_sample.append(len(doc_starts))
                    counts["num_samples"] += 1
                if max_tokens is not None and stream_tokens >= max_tokens:
                    break
        bar.close()
        if counts["num_samples"] == 0:
            raise ValueError(f"the inputs hold {stream_tokens} tokens, fewer than one sample of "
                             f"seq_len + 1 = {sample_len} tokens")
        index = {"shards": writer.shards}  # = index.json's list (which a remote upload does not keep locally)
        meta = dict(
            format=FORMAT, format_version=FORMAT_VERSION, seq_len=seq_len, sample_len=sample_len,
            tokenizer=tok.spec, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
            eos_token=getattr(tok, "eos_token", None), token_dtype=dtype.name,
            columns=columns, text_field=text_field, max_tokens=max_tokens, num_input_files=len(files),
            num_documents=counts["num_documents"], num_empty_documents=counts["num_empty_documents"],
            num_tokens=counts["num_samples"] * sample_len, num_tokens_dropped=packer.leftover,
            num_samples=counts["num_samples"], num_shards=len(index["shards"]), compression=compression,
            shards=shard_stats(index["shards"], docs_per_sample, sample_len),
        )
        if remote is not None:
            _upload_meta(partial, remote, meta)  # last: marks the remote copy complete
        else:
            (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(partial, out)
    finally:
        if documents is not None:
            documents.close()
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
    return dict(meta, out=str(out), seconds=round(time.time() - start, 2))


def shard_stats(shards: list[dict], docs_per_sample: list[int], sample_len: int) -> list[dict]:
    """Per-shard statistics from index.json's shard list and the document starts of every sample."""
    stats, first = [], 0
    for shard in shards:
        n = shard["samples"]
        zip_data = shard.get("zip_data") or {}
        stats.append(dict(basename=(zip_data or shard["raw_data"])["basename"], num_samples=n,
                          num_tokens=n * sample_len, num_documents=int(sum(docs_per_sample[first:first + n])),
                          bytes=shard["raw_data"]["bytes"], zip_bytes=zip_data.get("bytes")))
        first += n
    return stats


def _existing_meta(out: str | Path) -> dict | None:
    """The meta of a complete prepare at `out` (local or remote), else None."""
    if isinstance(out, Path):
        meta = read_meta(out) if out.is_dir() else None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            from streaming.base.storage import CloudDownloader

            try:
                CloudDownloader.direct_download(f"{out}/{META_FILE}", os.path.join(tmp, META_FILE))
            except Exception:  # absent (each cloud raises its own type): nothing there yet
                return None
            meta = read_meta(tmp)
    return meta if meta is not None and meta.get("format") == FORMAT else None


def _upload_meta(staging: Path, remote: str, meta: dict) -> None:
    from streaming.base.storage import CloudUploader

    staging.mkdir(parents=True, exist_ok=True)  # the writer removes its local directory when done
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    CloudUploader.get((str(staging), remote), keep_local=True, exist_ok=True).upload_file(META_FILE)


def _remove_dead_partials(out: Path) -> None:
    """Delete .<out>.partial-<pid> directories left by killed prepares (their process is gone)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists():
            shutil.rmtree(path, ignore_errors=True)


def read_meta(path: str | os.PathLike) -> dict | None:
    """prepare_meta.json of a prepared directory, or None when absent."""
    meta = Path(path) / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, action="extend",
                   help="files, directories (searched for .txt/.jsonl/.parquet) or globs")
    p.add_argument("--tokenizer", required=True, help="path to a Hugging Face tokenizer.json, or 'bytes'")
    p.add_argument("--out", required=True, help="output directory or object-store URL, e.g. s3://bucket/prefix (MDS shards + prepare_meta.json)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence")
    p.add_argument("--text-field", default="text", help="field holding the text: JSON key in .jsonl, column in .parquet")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--shard-size-limit", default="64mb", help="MDS shard size limit, e.g. 64mb or 67108864")
    p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd or zstd:7")
    p.add_argument("--eos-token", default=None, help="end-of-document token when it cannot be detected")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--skip-existing", action="store_true", help="keep a complete existing --out and exit")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output identical for any number)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    limit = int(args.shard_size_limit) if args.shard_size_limit.isdigit() else args.shard_size_limit
    try:
        summary = prepare(args.input, args.tokenizer, args.out, args.seq_len, text_field=args.text_field,
                          max_tokens=args.max_tokens, shard_size_limit=limit, compression=args.compression,
                          eos_token=args.eos_token, overwrite=args.overwrite, skip_existing=args.skip_existing,
                          workers=args.workers, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        p.exit(2, f"error: {err}\n")
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    return (f"prepared {s['num_documents']:,} documents from {s['num_input_files']:,} files: "
            f"{s['num_tokens']:,} tokens in {s['num_samples']:,} samples of {s['sample_len']} tokens "
            f"(seq_len {s['seq_len']}), {s['num_shards']} shards, {s['num_tokens_dropped']:,} tail tokens "
            f"dropped, vocab {s['vocab_size']} (eos {s['eos_id']}) -> {s['out']} [{s['seconds']:.1f}s]"
            + ("" if not s.get("shards") else
               f"\nper shard: {min(x['num_samples'] for x in s['shards']):,}-"
               f"{max(x['num_samples'] for x in s['shards']):,} samples, "
               f"{min(x['num_documents'] for x in s['shards']):,}-{max(x['num_documents'] for x in s['shards']):,}"
               f" document starts (all per-shard stats in {META_FILE})")
            + (" (complete output kept: --skip-existing)" if s.get("skipped") else ""))


if __name__ == "__main__":
    main()
