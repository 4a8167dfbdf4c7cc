"""Fixtures for the data tests: a private TMPDIR per test (streaming's filelocks) and shared-memory cleanup."""
from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import pytest

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    """Each test gets its own TMPDIR (streaming's filelocks); stale streaming shared memory is removed after."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches its first answer
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    yield tmp
    gc.collect()
    if any(name.endswith("_filelock") for name in os.listdir(tmp)):  # streaming was used
        from data.dataset import clean_stale_streaming_shm
        clean_stale_streaming_shm(tmp)


def write_corpus(root: Path, num_txt: int = 3, num_jsonl_docs: int = 40, field: str = "text") -> Path:
    """Distinct documents of varied length (some longer than a sample) in .txt files and one .jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_txt):
        (root / f"doc{i}.txt").write_text(f"text file {i}: " + "lorem ipsum é ∑ " * (5 + 13 * i) + "\n")
    with open(root / "docs.jsonl", "w") as f:
        for i in range(num_jsonl_docs):
            f.write(json.dumps({field: f"jsonl document {i:03d} " + "abc " * (i % 11), "id": i}) + "\n")
        f.write(json.dumps({field: ""}) + "\n")  # an empty document is skipped
    return root


def expected_documents(root: Path, field: str = "text") -> list[str]:
    """The non-empty documents of write_corpus in the order prepare reads them (sorted paths)."""
    docs = []
    for path in sorted(root.iterdir(), key=lambda p: str(p.resolve())):
        if path.suffix == ".jsonl":
            docs += [json.loads(line)[field] for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".txt":
            docs.append(path.read_text())
    return [d for d in docs if d]
