"""data.streams mixtures through streaming's Stream mixing: proportions, repeat/choose, config errors,
and resumption on a different dp size (2 gloo ranks <-> 1) that keeps the epoch's multiset of samples."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.dataset import build_train_loader
from data.prepare import prepare
from data.streams import stream_specs

SEQ_LEN, MB = 16, 4
SIZES = {"a": 40, "b": 24}  # samples per stream


def _prepare(root: Path, name: str, num_samples: int) -> Path:
    """num_samples distinct samples whose bytes (letters `name`, digits, spaces) no other stream uses."""
    corpus = root / f"{name}.jsonl"
    docs = [" ".join(f"{name}{i}{name}{j}" for j in range(1 + i % 5)) for i in range(300)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / name
    prepare([corpus], "bytes", out, SEQ_LEN, progress=False, max_tokens=num_samples * (SEQ_LEN + 1),
            shard_size_limit=300)
    return out


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    return {name: _prepare(root, name, n) for name, n in SIZES.items()}


def samples(batches):
    return [tuple(t.tolist()) + (l[-1].item(),) for b in batches for t, l in zip(b["tokens"], b["labels"])]


def origin(sample) -> str:
    """Which stream a sample comes from: the only letter among its bytes (EOS is 256)."""
    letters = {chr(t) for t in sample if t < 256 and chr(t).isalpha()}
    assert len(letters) == 1, letters
    return letters.pop()


def read_epoch(**kw):
    return samples(build_train_loader(seq_len=SEQ_LEN, micro_batch_size=MB, seed=3, **kw))


def test_single_stream_equals_path(streams):
    """data.path is the one-stream case of data.streams: same samples in the same order."""
    assert read_epoch(path=streams["a"]) == read_epoch(streams=[{"path": str(streams["a"])}])


def test_proportions_over_an_epoch(streams):
    """proportion 1:3 over an epoch of |a| + |b| = 64 samples: streaming chooses floor(p x 64) per stream
    (+1 for rounding leftovers), so each share is exact to 1/64; b (24 samples, 48 drawn) repeats each
    sample exactly twice, a (40 samples, 16 drawn) is subsampled without repeats."""
    epoch = read_epoch(streams=[{"path": str(streams["a"]), "proportion": 1.0},
                                {"path": str(streams["b"]), "proportion": 3.0}])
    total = sum(SIZES.values())
    assert len(epoch) == total
    share = Counter(origin(s) for s in epoch)
    assert abs(share["a"] / total - 0.25) <= 1 / total and abs(share["b"] / total - 0.75) <= 1 / total
    per_sample = Counter(epoch)
    assert {per_sample[s] for s in epoch if origin(s) == "a"} == {1}
    assert {per_sample[s] for s in epoch if origin(s) == "b"} == {2}
    assert len({s for s in epoch if origin(s) == "b"}) == SIZES["b"]


def test_repeat_and_choose(streams):
    epoch = read_epoch(streams=[{"path": str(streams["a"]), "repeat": 0.5},
                                {"path": str(streams["b"]), "choose": 12}])
    assert Counter(origin(s) for s in epoch) == {"a": 20, "b": 12}
    assert len(set(epoch)) == 32  # both below their stream's size: no sample twice


@pytest.mark.parametrize("streams_cfg, message", [
    ([], r"data\.streams is empty"),
    ([{"proportion": 1.0}], r"data\.streams\[0\]\.path is missing"),
    ([{"remote": "s3://b/x"}], r"data\.streams\[0\]\.local is missing.*cache"),
    ([{"path": "A", "proportion": -1}], r"data\.streams\[0\]\.proportion=-1: must be a number > 0"),
    ([{"path": "A", "proportion": 1}, {"path": "B"}], r"data\.streams\[1\]: no proportion"),
    ([{"path": "A", "proportion": 1, "repeat": 2}], r"data\.streams\[0\]: at most one of"),
    ([{"path": "A", "choose": 0}], r"data\.streams\[0\]\.choose=0"),
    ([{"path": "A", "weight": 2}], r"data\.streams\[0\]: unknown key"),
])
def test_stream_spec_errors(streams_cfg, message):
    with pytest.raises(ValueError, match=message):
        stream_specs(None, streams_cfg)


def test_missing_stream_directory_named(streams, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data\.streams\[1\]: no prepared dataset at {tmp_path}/nope"):
        read_epoch(streams=[{"path": str(streams["a"]), "proportion": 1},
                            {"path": str(tmp_path / "nope"), "proportion": 1}])


def _launch_dp2(tmp_path, private_tmpdir, loader_kw, first_batches, resume_state):
    world, job = 2, tmp_path / "job.json"
    job.write_text(json.dumps({"loader": loader_kw, "first_batches": first_batches, "resume_state": resume_state}))
    worker = Path(__file__).with_name("resume_worker.py")
    env = {**os.environ, "TMPDIR": str(private_tmpdir), "PYTHONPATH": str(Path(__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(tmp_path / "init"),
                               str(job), str(tmp_path / f"rank{r}.json")], env=env) for r in range(world)]
    assert [p.wait(timeout=600) for p in procs] == [0] * world
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _tuples(rows):
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("mixture", [False, True], ids=["one_stream", "mixture"])
def test_resume_on_other_dp_size_keeps_the_epoch(streams, tmp_path, private_tmpdir, mixture):
    """Global batch 8 samples: dp=2 x micro-batch 4, or dp=1 x 2 micro-batches of 4. Stop after a random
    number of optimizer steps, resume on the other dp size (2 -> 1 and 1 -> 2) and read to the end of the
    epoch: the multiset of samples seen equals one uninterrupted epoch's (no duplicates, no gaps)."""
    if mixture:
        kw = {"streams": [{"path": str(streams["a"]), "proportion": 1.0},
                          {"path": str(streams["b"]), "proportion": 3.0}]}
    else:
        kw = {"path": str(streams["a"])}
    kw.update(seq_len=SEQ_LEN, micro_batch_size=MB, seed=11)
    steps_per_epoch = sum(SIZES.values()) // 8 if mixture else SIZES["a"] // 8
    rng = random.Random(2026 + mixture)
    stop_dp2, stop_dp1 = rng.randrange(1, steps_per_epoch), rng.randrange(1, steps_per_epoch)
    print(f"dp2 stops after {stop_dp2}, dp1 after {stop_dp1} of {steps_per_epoch} steps")

    dp1 = build_train_loader(**kw)  # dp=1 runs in this process
    it = iter(dp1)
    first_dp1 = samples(next(it) for _ in range(2 * stop_dp1))
    state_dp1 = dp1.state_dict()
    del it
    ranks = _launch_dp2(tmp_path, private_tmpdir, kw, stop_dp2, state_dp1)

    epoch = Counter(t for r in ranks for t in _tuples(r["epoch"]))
    assert sum(epoch.values()) == 8 * steps_per_epoch
    assert Counter(samples(build_train_loader(**kw))) == epoch  # dp=1 and dp=2 read the same epoch

    # 2 -> 1: the state after the first stop_dp2 steps on 2 ranks, resumed on one
    assert ranks[0]["state"] == ranks[1]["state"]
    resumed = build_train_loader(**kw)
    resumed.load_state_dict(ranks[0]["state"])
    seen = [t for r in ranks for t in _tuples(r["first"])] + samples(resumed)
    assert Counter(seen) == epoch

    # 1 -> 2: the state after stop_dp1 steps on one rank, resumed on 2
    seen = first_dp1 + [t for r in ranks for t in _tuples(r["resumed"])]
    assert Counter(seen) == epoch
