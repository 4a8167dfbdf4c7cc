"""data.dataset: batches, document ids, rank splits, resumption and error messages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.dataset import build_train_loader, clean_stale_streaming_shm, infinite_batches
from data.prepare import prepare
from data.registration_lock import streaming_registration_lock

SEQ_LEN, NUM_SAMPLES, EOS = 32, 48, 256


@pytest.fixture
def prepared(tmp_path):
    """NUM_SAMPLES distinct byte-tokenized samples (the count divides every rank/batch split below)."""
    corpus = tmp_path / "in.jsonl"  # numbered words: no two samples are equal
    docs = [" ".join(f"w{i}.{j}" for j in range(i % 9)) for i in range(400)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "mds"
    prepare([corpus], "bytes", out, SEQ_LEN, progress=False, max_tokens=NUM_SAMPLES * (SEQ_LEN + 1),
            shard_size_limit=600)
    return out


def loader(path, **kw):
    kw = {"seq_len": SEQ_LEN, "micro_batch_size": 4, "seed": 7, **kw}
    return build_train_loader(path, **kw)


def rows(batches):
    """Each sample as a tuple of its seq_len + 1 tokens (samples are distinct, so this identifies them)."""
    return [tuple(t.tolist()) + (l[-1].item(),) for b in batches for t, l in zip(b["tokens"], b["labels"])]


def test_batch_contents(prepared):
    batches = list(loader(prepared))
    assert len(batches) == NUM_SAMPLES // 4
    b = batches[0]
    assert set(b) == {"tokens", "labels", "seq_idx"}
    assert b["tokens"].shape == b["labels"].shape == b["seq_idx"].shape == (4, SEQ_LEN)
    assert (b["tokens"].dtype, b["labels"].dtype, b["seq_idx"].dtype) == (torch.int64, torch.int64, torch.int32)
    samples = rows(batches)
    assert len(set(samples)) == NUM_SAMPLES  # one epoch = every sample once
    for batch in batches:
        tokens, labels, seq_idx = batch["tokens"], batch["labels"], batch["seq_idx"]
        assert torch.equal(labels[:, :-1], tokens[:, 1:])
        assert (seq_idx[:, 0] == 0).all()
        # seq_idx increases by one exactly after each EOS, and never otherwise
        assert torch.equal(seq_idx.diff(dim=1), (tokens[:, :-1] == EOS).int())


def test_seq_idx_separates_documents(prepared):
    """Positions share a seq_idx exactly when they belong to the same document of the token stream."""
    all_tokens = np.concatenate([np.array(r) for r in rows(loader(prepared, shuffle=False))])
    doc_of_token = np.concatenate([[0], np.cumsum(all_tokens[:-1] == EOS)])  # global document ids
    for k, batch in enumerate(loader(prepared, shuffle=False)):
        for j in range(4):
            start = (4 * k + j) * (SEQ_LEN + 1)
            docs = doc_of_token[start:start + SEQ_LEN]
            seq_idx = batch["seq_idx"][j].numpy()
            assert (np.equal.outer(docs, docs) == np.equal.outer(seq_idx, seq_idx)).all()


def test_shuffle_seed(prepared):
    a, b, c = (rows(loader(prepared, seed=s)) for s in (1, 1, 2))
    assert a == b and a != c and sorted(a) == sorted(c)


def _read_on_ranks(world, prepared, private_tmpdir, tmp_path) -> list[dict]:
    worker = Path(__file__).with_name("rank_worker.py")
    env = {**os.environ, "TMPDIR": str(private_tmpdir), "PYTHONPATH": str(Path(__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(tmp_path / "init"),
                               str(prepared), str(SEQ_LEN), str(tmp_path / f"rank{r}.json")], env=env)
             for r in range(world)]
    assert [p.wait(timeout=600) for p in procs] == [0] * world
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_ranks_split_and_replicate(prepared, private_tmpdir, tmp_path):
    """2 gloo ranks: as 2 dp ranks they read disjoint halves; as one dp replica (dp_size=1, e.g. tp=2)
    they read identical batches."""
    results = _read_on_ranks(2, prepared, private_tmpdir, tmp_path)
    dp = [{tuple(x) for x in r["dp"]} for r in results]
    assert all(len(s) == NUM_SAMPLES // 2 for s in dp) and len(set.union(*dp)) == NUM_SAMPLES
    rep = [r["replicated"] for r in results]
    assert rep[0] == rep[1] and len(rep[0]) == NUM_SAMPLES == len({tuple(x) for x in rep[0]})


@pytest.mark.slow
def test_replicas_of_non_consecutive_ranks(prepared, private_tmpdir, tmp_path):
    """4 gloo ranks in megatron's pipeline-last layout (pp=2 x dp=2: replica 0 is ranks 0 and 2, replica 1
    ranks 1 and 3): the ranks of a replica read identical batches, the two replicas disjoint halves."""
    results = _read_on_ranks(4, prepared, private_tmpdir, tmp_path)
    pp_last = [r["pp_last"] for r in results]
    assert pp_last[0] == pp_last[2] and pp_last[1] == pp_last[3]
    halves = [{tuple(x) for x in pp_last[r]} for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == NUM_SAMPLES // 2 and not halves[0] & halves[1]
    replicated = [r["replicated"] for r in results]
    assert all(rep == replicated[0] for rep in replicated) and len(replicated[0]) == NUM_SAMPLES


def test_impossible_dp_coordinates_are_errors(prepared, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="dp_size=3"):
        loader(prepared, dp_rank=0, dp_size=3)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        loader(prepared, dp_rank=2, dp_size=2)


@pytest.mark.parametrize("resume_workers", [0, 2])
def test_resume_reproduces_order(prepared, resume_workers):
    first = loader(prepared)
    batches = infinite_batches(first)
    for _ in range(5):
        next(batches)
    state = first.state_dict()
    rest = rows([next(batches) for _ in range(12)])  # past the end of epoch 0 (12 batches) into epoch 1
    resumed = loader(prepared, num_workers=resume_workers)
    resumed.load_state_dict(state)
    again = infinite_batches(resumed)
    assert rows([next(again) for _ in range(12)]) == rest


def test_resume_at_epoch_end_and_epochs_differ(prepared):
    first = loader(prepared)
    batches = infinite_batches(first)
    epoch0 = rows([next(batches) for _ in range(12)])
    state = first.state_dict()
    assert state["epoch"] == 0 and state["sample_in_epoch"] == NUM_SAMPLES
    epoch1 = rows([next(batches) for _ in range(12)])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # a new shuffle each epoch
    resumed = loader(prepared)
    resumed.load_state_dict(state)
    again = infinite_batches(resumed)
    assert rows([next(again) for _ in range(12)]) == epoch1


def test_workers_cover_the_epoch(prepared):
    assert sorted(rows(loader(prepared, num_workers=2))) == sorted(rows(loader(prepared)))


def test_errors_name_values_and_paths(prepared, tmp_path):
    with pytest.raises(ValueError, match=rf"seq_len=64.*{prepared}.*seq_len={SEQ_LEN}"):
        loader(prepared, seq_len=64)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'}.*python -m data\.prepare"):
        loader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json.*python -m data.prepare"):
        loader(tmp_path / "empty")
    with pytest.raises(ValueError, match="vocab_size=100.*vocab_size=257"):
        loader(prepared, vocab_size=100)
    with pytest.raises(RuntimeError, match="no batches"):
        next(infinite_batches(loader(prepared, micro_batch_size=NUM_SAMPLES + 1)))


KILLED_RUN = """
import os, signal, sys
from data.dataset import build_train_loader
next(iter(build_train_loader(sys.argv[1], seq_len=int(sys.argv[2]), micro_batch_size=4, seed=0)))
os.killpg(0, signal.SIGKILL)  # with the resource tracker, which would otherwise unlink the blocks
"""


def test_clean_stale_shm_after_kill(prepared, private_tmpdir):
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(prepared), str(SEQ_LEN)],
                          env={**os.environ, "TMPDIR": str(private_tmpdir)}, cwd=Path(__file__).parents[2],
                          start_new_session=True)  # its own process group, killed as a whole
    assert proc.returncode == -signal.SIGKILL
    prefixes = {name[:6] for name in os.listdir(private_tmpdir) if name.endswith("_filelock")}
    assert len(prefixes) == 1
    dead = prefixes.pop()
    leaked = os.stat(f"/dev/shm/{dead}_locals").st_ino  # leaked by the killed process group
    live_loader = loader(prepared, clean_stale_shm=False)  # a live run beside the leak
    next(iter(live_loader))
    live = f"{live_loader.dataset._shm_prefix_int:06}"
    assert live != dead
    assert clean_stale_streaming_shm(private_tmpdir) == [dead]
    # gone (the prefix may already serve a new dataset of a concurrent run: then it is another file)
    assert not os.path.exists(f"/dev/shm/{dead}_locals") or os.stat(f"/dev/shm/{dead}_locals").st_ino != leaked
    assert not [n for n in os.listdir(private_tmpdir) if dead in n]  # filelocks and owner record
    assert os.path.exists(f"/dev/shm/{live}_locals")  # the live run's blocks are kept
    assert len(list(live_loader)) == NUM_SAMPLES // 4  # and it still works
    assert clean_stale_streaming_shm(private_tmpdir) == []


def test_a_stray_block_does_not_make_a_second_dataset_collide(prepared):
    """A streaming block left without its prefix's locals block (a run killed while it freed its
    blocks; seen as /dev/shm/000000_resume after test sessions) made streaming pick, for a dataset
    built beside a live one, the live one's prefix: FileExistsError '/NNNNNN_locals'. build_train_loader
    removes such orphans first."""
    from multiprocessing import resource_tracker
    from multiprocessing.shared_memory import SharedMemory

    with streaming_registration_lock():  # no other test worker registers the prefix picked here meanwhile
        taken = {name[:6] for name in os.listdir("/dev/shm")}
        stray = f"{next(p for p in range(10**6) if f'{p:06}' not in taken):06}_resume"
        block = SharedMemory(stray, create=True, size=4096)
    resource_tracker.unregister(block._name, "shared_memory")  # leaked: nobody unlinks it at exit
    block.close()
    try:
        first = loader(prepared)
        assert not os.path.exists(f"/dev/shm/{stray}")
        next(iter(first))
        second = loader(prepared)  # beside the live first dataset
        assert second.dataset._shm_prefix_int != first.dataset._shm_prefix_int
        assert len(list(second)) == len(list(first)) == NUM_SAMPLES // 4
    finally:
        if os.path.exists(f"/dev/shm/{stray}"):
            os.unlink(f"/dev/shm/{stray}")


def test_config_pins_num_canonical_nodes_and_refuses_a_count_that_does_not_fit_the_nodes(prepared, monkeypatch):
    """data.num_canonical_nodes reaches streaming (which keeps it in the loader state, so a resume on
    another node count keeps the order); a value that neither divides nor is a multiple of this run's
    node count (WORLD_SIZE / LOCAL_WORLD_SIZE) is refused before any data is read."""
    from pretrain.config import ConfigError, load_config, validate
    from pretrain.distributed import DistInfo
    from pretrain.trainer import build_data

    cfg = load_config(["configs/demo.yaml"], [f"data.path={prepared}", "data.demo_corpus=false",
                                              f"data.seq_len={SEQ_LEN}", "data.num_canonical_nodes=2"])
    first = build_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")), validate(cfg, 1))
    batches = infinite_batches(first)
    next(batches)
    assert first.dataset.num_canonical_nodes == 2 and first.state_dict()["num_canonical_nodes"] == 2
    default = build_data(load_config(["configs/demo.yaml"], [f"data.path={prepared}", "data.demo_corpus=false",
                                                               f"data.seq_len={SEQ_LEN}"]),
                         DistInfo(0, 1, 0, torch.device("cpu")), validate(cfg, 1))
    next(infinite_batches(default))
    assert default.dataset.num_canonical_nodes == 1  # streaming's default for its py1e shuffle: the node count

    cfg = load_config(["configs/demo.yaml"], [f"data.path={prepared}", "data.num_canonical_nodes=3",
                                              "data.global_batch_size=16"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # 2 ranks, one per node: 2 nodes
    with pytest.raises(ConfigError, match=r"data.num_canonical_nodes=3: .*number of nodes of this run \(2\)"):
        build_data(cfg, DistInfo(0, 2, 0, torch.device("cpu")), validate(cfg, 2))
    with pytest.raises(ConfigError, match=r"data.num_canonical_nodes=0: must be null or > 0"):
        validate(load_config(["configs/demo.yaml"], ["data.num_canonical_nodes=0"]), 1)
