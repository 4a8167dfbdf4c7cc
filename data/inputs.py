"""Raw text inputs of data.prepare: finding files (paths, directories, globs) and reading documents.

    files = find_inputs(["corpus/", "more/*.parquet"])        # sorted, de-duplicated
    for text, nbytes in iter_documents(files, text_field="text"): ...

Formats, by suffix: .jsonl (one JSON object per line; the `text_field` string is the document), .parquet
(the `text_field` column, one row per document; null rows are empty documents), anything else one plain
text document. Directories are searched recursively for .txt, .jsonl and .parquet. `nbytes` is the share
of the input file a document accounts for (for a progress bar in bytes).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

SEARCHED_SUFFIXES = (".txt", ".jsonl", ".parquet")  # what directories are searched for
_GLOB_CHARS = set("*?[")


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
            yield from _jsonl(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet(path, text_field)
        else:
            raw = path.read_bytes()
            yield raw.decode("utf-8", errors="replace"), len(raw)


def _jsonl(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
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


def _parquet(path: Path, text_field: str, batch_rows: int = 4096) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {schema.names}; choose with --text-field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} has type {kind}, not string")
    size, rows, done, credited = path.stat().st_size, max(pf.metadata.num_rows, 1), 0, 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        texts = batch.column(0).to_pylist()
        done += len(texts)
        share = size * done // rows - credited  # the file's bytes, spread over its rows
        credited += share
        for i, text in enumerate(texts):
            yield (text or ""), (share if i == 0 else 0)
