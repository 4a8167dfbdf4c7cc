"""Object storage end to end against a real S3-compatible server (moto, 127.0.0.1): data.prepare writes
shards to s3://, the loader streams them back through a local cache, and the samples equal the local run's."""
from __future__ import annotations

import json

import pytest
from data_test_utils import write_corpus

from data.dataset import build_train_loader
from data.prepare import META_FILE, prepare

try:
    import boto3
    import moto  # noqa: F401
    from s3_server import local_s3
except ImportError as err:  # moto is in the dev extra
    pytest.skip(f"moto[server] is not installed ({err}); pip install -e '.[dev]'", allow_module_level=True)

SEQ_LEN, BUCKET = 32, "hp-data"


@pytest.fixture(scope="module")
def s3():
    with local_s3(BUCKET) as endpoint:
        yield boto3.client("s3", endpoint_url=endpoint)


def samples(loader):
    return [tuple(t.tolist()) for b in loader for t in b["tokens"]]


def test_prepare_to_s3_and_stream_back(tmp_path, s3):
    corpus = write_corpus(tmp_path / "in", num_jsonl_docs=200)
    kw = dict(progress=False, shard_size_limit=1500, compression="zstd")
    local = prepare([corpus], "bytes", tmp_path / "local", SEQ_LEN, **kw)
    remote = prepare([corpus], "bytes", f"s3://{BUCKET}/ds", SEQ_LEN, workers=2, **kw)
    assert remote["out"] == f"s3://{BUCKET}/ds" and remote["num_shards"] == local["num_shards"] > 2
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ds/")["Contents"]}
    assert keys == {f"ds/{s['basename']}" for s in local["shards"]} | {"ds/index.json", f"ds/{META_FILE}"}
    assert not list(tmp_path.glob("tmpdir/prepare-staging-*"))  # the staging directory is removed

    loader_kw = dict(seq_len=SEQ_LEN, micro_batch_size=4, seed=5)
    from_local = samples(build_train_loader(tmp_path / "local", **loader_kw))
    cache = tmp_path / "cache"
    from_s3 = samples(build_train_loader(streams=[{"remote": f"s3://{BUCKET}/ds", "local": str(cache)}], **loader_kw))
    assert from_s3 == from_local and len(from_local) == 4 * (local["num_samples"] // 4)
    assert {p.name for p in cache.iterdir()} >= {"index.json", META_FILE}  # shards came through the cache

    # rerun: complete remote output is kept with skip_existing, refused without overwrite
    assert prepare([corpus], "bytes", f"s3://{BUCKET}/ds", SEQ_LEN, skip_existing=True, **kw)["skipped"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([corpus], "bytes", f"s3://{BUCKET}/ds", SEQ_LEN, **kw)


def test_interrupted_remote_prepare_is_refused(tmp_path, s3, monkeypatch):
    """A remote prepare that dies after its first shards leaves the 'incomplete' meta: the loader refuses it."""
    corpus = write_corpus(tmp_path / "in", num_jsonl_docs=200)
    import data.prepare as prep

    real_add, calls = prep.Packer.add, {"n": 0}

    def failing_add(self, doc):
        calls["n"] += 1
        if calls["n"] == 150:
            raise RuntimeError("killed")
        return real_add(self, doc)

    monkeypatch.setattr(prep.Packer, "add", failing_add)
    with pytest.raises(RuntimeError, match="killed"):
        prepare([corpus], "bytes", f"s3://{BUCKET}/half", SEQ_LEN, progress=False, shard_size_limit=600)
    meta = json.loads(s3.get_object(Bucket=BUCKET, Key=f"half/{META_FILE}")["Body"].read())
    assert meta["format"] == "incomplete"
    with pytest.raises(FileNotFoundError, match=r"data\.path|streams\[0\]"):
        build_train_loader(streams=[{"remote": f"s3://{BUCKET}/half", "local": str(tmp_path / "c")}],
                           seq_len=SEQ_LEN, micro_batch_size=4, seed=0)
    with pytest.raises(FileNotFoundError, match=rf"s3://{BUCKET}/nothing"):
        build_train_loader(streams=[{"remote": f"s3://{BUCKET}/nothing", "local": str(tmp_path / "d")}],
                           seq_len=SEQ_LEN, micro_batch_size=4, seed=0)
