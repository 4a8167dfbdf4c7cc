"""data.prepare at scale: parquet inputs, parallel workers (identical output), per-shard stats,
rerun semantics (--skip-existing / --overwrite), and an interrupted prepare never looks complete."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_test_utils import build_bpe, expected_documents, write_corpus

from data.prepare import META_FILE, main, prepare
from data.streams import StreamSpec, check_stream
from test_data_prepare import read_samples

SEQ_LEN = 32


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def write_parquet(path: Path, texts, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path, row_group_size=7)
    return path


def test_parquet_equals_jsonl(tmp_path):
    """The same documents as .parquet (null and empty rows skipped) and as .jsonl give the same samples."""
    corpus = write_corpus(tmp_path / "in", field="body")
    docs = expected_documents(corpus, field="body")
    write_parquet(tmp_path / "docs.parquet", docs[:10] + [None, ""] + docs[10:], field="body")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    a = prepare([tmp_path / "docs.parquet"], "bytes", tmp_path / "pq", SEQ_LEN, text_field="body", progress=False)
    b = prepare([tmp_path / "docs.jsonl"], "bytes", tmp_path / "js", SEQ_LEN, text_field="body", progress=False)
    assert a["num_empty_documents"] == 2 and a["num_documents"] == b["num_documents"] == len(docs)
    np.testing.assert_array_equal(np.stack([s["tokens"] for s in read_samples(tmp_path / "pq")]),
                                  np.stack([s["tokens"] for s in read_samples(tmp_path / "js")]))
    with pytest.raises(ValueError, match=r"docs\.parquet: no column 'text'.*--text-field"):
        prepare([tmp_path / "docs.parquet"], "bytes", tmp_path / "x", SEQ_LEN, progress=False)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_workers_give_identical_output(tmp_path, tokenizer):
    """--workers 3 with small batches (many batches in flight, out-of-order completion possible) writes
    byte-identical shards and meta to workers=1."""
    corpus = write_corpus(tmp_path / "in", num_txt=5, num_jsonl_docs=300)
    spec = "bytes" if tokenizer == "bytes" else str(build_bpe(tmp_path / "tokenizer.json"))
    import data.encode as encode

    original = encode.encoded_documents

    def small_batches(*args, **kw):
        return original(*args, **{**kw, "batch_docs": 7})

    encode_mp = pytest.MonkeyPatch()
    encode_mp.setattr("data.prepare.encoded_documents", small_batches)
    try:
        one = prepare([corpus], spec, tmp_path / "w1", SEQ_LEN, progress=False, shard_size_limit=2000)
        three = prepare([corpus], spec, tmp_path / "w3", SEQ_LEN, progress=False, shard_size_limit=2000, workers=3)
    finally:
        encode_mp.undo()
    assert one["num_shards"] > 2
    assert _tree(tmp_path / "w1") == _tree(tmp_path / "w3")
    assert {k: v for k, v in one.items() if k != "seconds"} == {
        k: (str(tmp_path / "w1") if k == "out" else v) for k, v in three.items() if k != "seconds"}


def test_per_shard_stats(tmp_path):
    corpus = write_corpus(tmp_path / "in")
    meta = prepare([corpus], "bytes", tmp_path / "o", SEQ_LEN, progress=False, shard_size_limit=1000,
                   compression="zstd")
    stats = meta["shards"]
    samples = read_samples(tmp_path / "o")
    assert len(stats) == meta["num_shards"] > 1
    assert sum(s["num_samples"] for s in stats) == meta["num_samples"] == len(samples)
    assert all(s["num_tokens"] == s["num_samples"] * (SEQ_LEN + 1) for s in stats)
    first = 0
    for s in stats:
        assert s["num_documents"] == sum(len(x["doc_starts"]) for x in samples[first:first + s["num_samples"]])
        assert (tmp_path / "o" / s["basename"]).stat().st_size == s["zip_bytes"] and s["bytes"] > s["zip_bytes"]
        first += s["num_samples"]


def test_rerun_skip_or_redo(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "in")
    args = ["--input", str(corpus), "--tokenizer", "bytes", "--out", str(tmp_path / "o"), "--seq-len",
            str(SEQ_LEN), "--no-progress"]
    first = main(args)
    before = _tree(tmp_path / "o")
    kept = main(args + ["--skip-existing"])
    assert kept["skipped"] and kept["num_samples"] == first["num_samples"] and _tree(tmp_path / "o") == before
    assert "--skip-existing" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args)
    assert "--overwrite" in capsys.readouterr().err
    redone = main(args + ["--overwrite", "--seq-len", "16"])
    assert redone["seq_len"] == 16 and json.loads((tmp_path / "o" / META_FILE).read_text())["seq_len"] == 16


def test_interrupted_prepare_is_not_complete(tmp_path, monkeypatch):
    """A failure in the middle of writing leaves no output under the final name and no partial directory;
    a directory with shards but no meta (e.g. copied by hand) is refused by the loader."""
    corpus = write_corpus(tmp_path / "in", num_jsonl_docs=300)
    import data.prepare as prep

    real_packer_add = prep.Packer.add
    calls = {"n": 0}

    def failing_add(self, doc):
        calls["n"] += 1
        if calls["n"] == 200:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return real_packer_add(self, doc)

    monkeypatch.setattr(prep.Packer, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], "bytes", tmp_path / "o", SEQ_LEN, progress=False, shard_size_limit=500)
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    monkeypatch.undo()
    prepare([corpus], "bytes", tmp_path / "o", SEQ_LEN, progress=False, shard_size_limit=500)  # rerun redoes
    (tmp_path / "o" / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no prepare_meta.json.*interrupted prepare"):
        check_stream(StreamSpec(local=str(tmp_path / "o")), SEQ_LEN)
