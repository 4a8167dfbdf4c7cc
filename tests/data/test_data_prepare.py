"""data.prepare: packing into MDS shards reproduces the token stream and keeps document boundaries."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_test_utils import build_bpe, expected_documents, write_corpus
from streaming import StreamingDataset

from data.prepare import META_FILE, Packer, main, prepare, token_dtype
from data.registration_lock import streaming_registration_lock
from data.tokenizer import load_tokenizer

SEQ_LEN = 32


def read_samples(out):
    """All samples in order (StreamingDataset, which also decompresses shards)."""
    with streaming_registration_lock():  # other test workers build datasets at the same time
        ds = StreamingDataset(local=str(out), shuffle=False)
    return [ds[i] for i in range(ds.num_samples)]


def expected_stream(docs, tok):
    """Token stream and the global document id of every token."""
    ids, doc_ids = [], []
    for i, text in enumerate(docs):
        piece = tok.encode(text) + [tok.eos_id]
        ids += piece
        doc_ids += [i] * len(piece)
    return np.array(ids), np.array(doc_ids)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_samples_reproduce_stream(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "in")
    spec = "bytes" if tokenizer == "bytes" else str(build_bpe(tmp_path / "tokenizer.json"))
    summary = prepare([corpus], spec, tmp_path / "out", SEQ_LEN, progress=False, shard_size_limit=1000)
    tok = load_tokenizer(spec)
    stream, doc_ids = expected_stream(expected_documents(corpus), tok)
    samples = read_samples(tmp_path / "out")
    n = len(stream) // (SEQ_LEN + 1)
    assert summary["num_samples"] == len(samples) == n and summary["num_shards"] > 1
    assert summary["num_documents"] == len(expected_documents(corpus)) and summary["num_empty_documents"] == 1
    assert summary["num_tokens"] + summary["num_tokens_dropped"] == len(stream)
    tokens = np.concatenate([s["tokens"] for s in samples])
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, stream[:n * (SEQ_LEN + 1)])
    for k, s in enumerate(samples):  # doc_starts: 0, then exactly where a new document begins
        ids = doc_ids[k * (SEQ_LEN + 1):(k + 1) * (SEQ_LEN + 1)]
        np.testing.assert_array_equal(s["doc_starts"], [0] + list(np.flatnonzero(np.diff(ids)) + 1))


def test_meta(tmp_path):
    corpus = write_corpus(tmp_path / "in")
    s = prepare([corpus / "docs.jsonl", str(corpus / "*.txt")], "bytes", tmp_path / "out", SEQ_LEN,
                progress=False, max_tokens=10 * (SEQ_LEN + 1) + 5)
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["seq_len"] == SEQ_LEN and meta["sample_len"] == SEQ_LEN + 1
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["token_dtype"]) == ("bytes", 257, 256, "uint16")
    assert meta["num_samples"] == 10 and meta["num_tokens"] == 10 * (SEQ_LEN + 1) and meta["num_tokens_dropped"] == 5
    assert meta["num_input_files"] == 4
    assert {k: v for k, v in s.items() if k not in ("out", "seconds")} == meta


def test_deterministic_and_compressed(tmp_path):
    corpus = write_corpus(tmp_path / "in")
    for name in ("a", "b"):
        prepare([corpus], "bytes", tmp_path / name, SEQ_LEN, progress=False, compression="zstd",
                shard_size_limit=700)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b")) and any(f.endswith(".zstd") for f in files)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    plain = prepare([corpus], "bytes", tmp_path / "plain", SEQ_LEN, progress=False)
    np.testing.assert_array_equal(np.concatenate([s["tokens"] for s in read_samples(tmp_path / "a")]),
                                  np.concatenate([s["tokens"] for s in read_samples(tmp_path / "plain")]))
    assert plain["num_shards"] == 1


def test_packer_long_document_and_dtype():
    packer = Packer(5, np.dtype(np.uint16))
    out = list(packer.add(np.arange(12)))  # one document over two samples and a bit
    assert [s.tolist() for s, _ in out] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [d.tolist() for _, d in out] == [[0], [0]] and packer.leftover == 2
    out = list(packer.add(np.array([100, 101, 102])))
    assert out[0][0].tolist() == [10, 11, 100, 101, 102] and out[0][1].tolist() == [0, 2]
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_errors(tmp_path):
    corpus = write_corpus(tmp_path / "in")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        prepare([tmp_path / "missing_dir"], "bytes", tmp_path / "o", SEQ_LEN, progress=False)
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        prepare([str(tmp_path / "*.nothing")], "bytes", tmp_path / "o", SEQ_LEN, progress=False)
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: no string field 'body'.*--text-field"):
        prepare([corpus / "docs.jsonl"], "bytes", tmp_path / "o", SEQ_LEN, text_field="body", progress=False)
    with pytest.raises(ValueError, match="fewer than one sample"):
        prepare([corpus / "doc0.txt"], "bytes", tmp_path / "o", 4096, progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # failed runs leave nothing behind
    prepare([corpus], "bytes", tmp_path / "o", SEQ_LEN, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([corpus], "bytes", tmp_path / "o", SEQ_LEN, progress=False)
    assert prepare([corpus], "bytes", tmp_path / "o", 16, progress=False, overwrite=True)["seq_len"] == 16


def test_cli(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "in", field="content")
    tok = build_bpe(tmp_path / "tokenizer.json")
    summary = main(["--input", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "out"),
                    "--seq-len", "16", "--text-field", "content", "--shard-size-limit", "2kb", "--no-progress"])
    printed = capsys.readouterr().out
    for word in ("documents", "tokens", "samples", "shards", str(tmp_path / "out")):
        assert word in printed
    assert summary["vocab_size"] == load_tokenizer(tok).vocab_size and summary["num_shards"] > 1
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(corpus), "--tokenizer", str(tmp_path / "missing.json"),
              "--out", str(tmp_path / "o2"), "--seq-len", "16"])
    assert exc.value.code == 2 and "missing.json" in capsys.readouterr().err


def test_dead_partial_is_removed(tmp_path):
    corpus = write_corpus(tmp_path / "in")
    stale = tmp_path / ".out.partial-999999999"  # no such process
    stale.mkdir()
    prepare([corpus], "bytes", tmp_path / "out", SEQ_LEN, progress=False)
    assert not stale.exists() and (tmp_path / "out" / META_FILE).is_file()
