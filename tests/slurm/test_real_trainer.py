"""The real trainer (python -m pretrain.train) under slurm/train.sbatch on the local 2-node cluster:
a run preempted by USR1 checkpoints, requeues (Restarts=1), resumes, completes, and its loss curve
equals the same run left alone, with no step missing or twice; the run left alone (2 nodes x 1 task)
equals the same run under torchrun on one host (1 node x 2 processes).

mosaicml-streaming orders samples by its num_canonical_nodes, which defaults to the number of nodes:
the runs pin it (data.num_canonical_nodes=2) so that 2 nodes and 1 node read the same order.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.jobs import FINAL, cluster_report, job_info, job_log

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"
STEPS = 100  # ~0.05 s each: long enough that the USR1 lands mid-training

# a tiny hybrid (Mamba-2, attention, MoE) on bytes: seconds per run on CPU, all code paths
TINY = [
    "model.d_model=32", "model.vocab_size=264", "model.pattern=M*-E",
    "model.mamba.num_heads=4", "model.mamba.head_dim=8", "model.mamba.num_groups=2", "model.mamba.d_state=8",
    "model.mamba.chunk_size=8", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mlp.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ff=24",
    "data.seq_len=32", "data.micro_batch_size=4", "data.global_batch_size=8",
    "optim.lr=3e-3", "optim.warmup_steps=2", f"trainer.max_steps={STEPS}", "trainer.log_interval=1",
    "trainer.device=cpu", "kernels.backend=torch", "data.num_canonical_nodes=2",
]


def prepare_data(root: Path) -> Path:
    from data.prepare import prepare

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "mamba", "state", "space", "token", "expert", "router", "scan"]
    (root / "corpus").mkdir(parents=True)
    with open(root / "corpus" / "docs.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))})
                    + "\n")
    prepare([str(root / "corpus")], "bytes", root / "data", 32, progress=False)
    return root / "data"


def losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["step"] not in out, f"step {rec['step']} logged twice"
        out[rec["step"]] = rec["loss"]
    return out


def test_preempted_run_resumes_and_equals_uninterrupted_run(slurm_cluster, job_dir):
    pytest.importorskip("pretrain.checkpoint", reason="the trainer's checkpointing is not there yet")
    data = prepare_data(job_dir)
    args = [*TINY, f"data.path={data}", f"run.dir={job_dir / 'runs'}"]
    (job_dir / "tiny.yaml").write_text("{}\n")
    env = {**os.environ, "HP_REPO": str(REPO), "HP_RESIGNAL_SECONDS": "15", "PYTHONPATH": str(REPO)}

    def submit(name: str) -> str:
        res = subprocess.run(["sbatch", "--parsable", "--nodes=2", "-J", name, str(SBATCH), "tiny.yaml", *args],
                             cwd=job_dir, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    # Both jobs run side by side (each takes 1 CPU of each node): one left alone, one preempted.
    plain, preempted = submit("plain"), submit("preempted")
    run = job_dir / "runs" / f"preempted-{preempted}"
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
        assert job_info(preempted).get("JobState") not in FINAL, job_log(job_dir, preempted)
        assert time.monotonic() < deadline, f"no training step within 300 s\n{cluster_report()}\n{job_log(job_dir, preempted)}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], check=True, timeout=30)

    deadline = time.monotonic() + 420
    for job in (preempted, plain):
        while (info := job_info(job)).get("JobState") not in FINAL:
            if time.monotonic() > deadline:
                pytest.fail(f"job {job} not done within 420 s\n{cluster_report()}\n{job_log(job_dir, preempted)}")
            time.sleep(1)
        log = job_log(job_dir, job)
        assert info["JobState"] == "COMPLETED", log
        assert info["Restarts"] == ("1" if job == preempted else "0"), log

    log = job_log(job_dir, preempted)
    got, want = losses(run), losses(job_dir / "runs" / f"plain-{plain}")
    assert sorted(got) == list(range(1, STEPS + 1)), log  # none missing (losses() fails on duplicates)
    assert "resumed from" in log, log
    assert got == want, {s: (got[s], want[s]) for s in sorted(got) if got[s] != want[s]}  # bit-identical on CPU

    # the same run under torchrun, 1 node x 2 processes (gloo on both): the same losses
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pretrain.train", "--config", "tiny.yaml", *args, "run.name=torchrun"],
                          cwd=job_dir, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    under_torchrun = losses(job_dir / "runs" / "torchrun")
    assert under_torchrun == pytest.approx(want, rel=1e-6, abs=1e-7)
