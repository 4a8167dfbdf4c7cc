"""data.demo: the stdlib corpus is prepared once, cached, and readable by the train loader."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

import data.demo as demo
from data.dataset import build_train_loader
from data.prepare import read_meta

BUDGET = 100_000


def test_stdlib_sources_deterministic_without_tests():
    files = demo.stdlib_sources(max_bytes=2_000_000)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == demo.stdlib_sources(max_bytes=2_000_000)
    assert files == sorted(files, key=lambda p: str(p.relative_to(root)))
    for path in files:
        parts = path.relative_to(root).parts
        assert path.suffix == ".py" and not {"test", "tests", "site-packages"} & set(parts[:-1])
    assert sum(p.stat().st_size for p in files[:-1]) < 2_000_000 <= sum(p.stat().st_size for p in files)


def test_demo_is_cached(tmp_path, monkeypatch):
    out = demo.ensure_demo_data(tmp_path / "demo", seq_len=64, max_tokens=BUDGET, progress=False)
    meta = read_meta(out)
    assert (meta["seq_len"], meta["tokenizer"], meta["max_tokens"]) == (64, "bytes", BUDGET)
    assert meta["num_tokens"] + meta["num_tokens_dropped"] == BUDGET
    batch = next(iter(build_train_loader(out, seq_len=64, micro_batch_size=2, seed=0)))
    assert batch["tokens"].shape == (2, 64)

    def fail(*args, **kwargs):
        raise AssertionError("prepared again although cached")

    with monkeypatch.context() as m:
        m.setattr(demo, "prepare", fail)
        assert demo.ensure_demo_data(tmp_path / "demo", seq_len=64, max_tokens=BUDGET) == out
    demo.ensure_demo_data(tmp_path / "demo", seq_len=32, max_tokens=BUDGET, progress=False)  # new seq_len
    assert read_meta(out)["seq_len"] == 32
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_demo_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        demo.ensure_demo_data(tmp_path / "mine", seq_len=64, max_tokens=BUDGET, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_PRETRAIN_CACHE", str(tmp_path))
    assert demo.default_demo_dir(256) == tmp_path / "demo-bytes-seq256"
