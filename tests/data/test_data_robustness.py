"""Fail early with a message naming the stream and file: missing shard, truncated shard, empty stream,
wrong seq_len (also for one stream of a mixture)."""
from __future__ import annotations

import json

import pytest

from data.dataset import build_train_loader
from data.prepare import prepare

SEQ_LEN = 16


@pytest.fixture
def two(tmp_path):
    out = {}
    for name in ("a", "b"):
        corpus = tmp_path / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"{name} {i} " * (1 + i % 4)}) + "\n" for i in range(200)))
        out[name] = prepare([corpus], "bytes", tmp_path / name, SEQ_LEN, progress=False, shard_size_limit=400)
    return {k: tmp_path / k for k in out}


def load(streams, seq_len=SEQ_LEN):
    return build_train_loader(streams=[{"path": str(p), "proportion": 1.0} for p in streams], seq_len=seq_len,
                              micro_batch_size=2, seed=0)


def _shard(path, k=1):
    return path / json.loads((path / "index.json").read_text())["shards"][k]["raw_data"]["basename"]


def test_missing_shard(two):
    _shard(two["b"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"data\.streams\[1\]: shard shard\.00001\.mds .*missing"):
        load([two["a"], two["b"]])


def test_truncated_shard(two):
    shard = _shard(two["a"], 2)
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ValueError, match=rf"data\.streams\[0\]: shard {shard} is corrupt: \d+ bytes, index\.json says"):
        load([two["a"], two["b"]])


def test_empty_stream(two):
    index = json.loads((two["b"] / "index.json").read_text())
    (two["b"] / "index.json").write_text(json.dumps({**index, "shards": []}))
    with pytest.raises(ValueError, match=rf"data\.streams\[1\]: the stream at {two['b']} is empty"):
        load([two["a"], two["b"]])


def test_wrong_seq_len_names_the_stream(two):
    with pytest.raises(ValueError, match=rf"seq_len=32 but {two['a']} \(data\.streams\[0\]\) was prepared with seq_len=16"):
        load([two["a"], two["b"]], seq_len=32)
