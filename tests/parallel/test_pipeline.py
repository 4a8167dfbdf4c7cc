"""Pipeline parallelism (parallel.pp, parallel.virtual_pp) on CPU/gloo against the single-process model.

Two launches (a launch costs 10-25 s of imports per rank): 2 ranks run pp=2 with 1F1B (4 micro-batches
per step), pp=2 split at `|` into uneven stages with the softmax router's aux loss on the first stage
and z-loss, pp=2 x virtual_pp=2 (4 chunks, interleaved schedule), pp=2 with the chunked loss (tp = cp = 1:
the last stage hands hidden states, not logits, to the loss), and a pp2 -> pp1 checkpoint reload; 4
ranks run pp2 x dp2 x ep2, tp2 x pp2 with sequence parallelism and pp2 x cp2 x ep2 (softmax router); 8
ranks run the issue's example tp2 x pp2 x ep2 (x dp2). Every batch is packed (two documents per row,
seq_idx). For each: the global batch's loss and every gradient after one step equal the single-process
run (relative 1e-5 in float32, or within 3x float32's own error against float64 where that is larger),
the loss curve and grad norms of 20 optimizer steps (1F1B, interleaved, pp2 x dp2 x ep2; 4-6 for the
others) match, MoE loads equal the single process's and sum to routed tokens x top_k, parameter counts
are the whole model's.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pipeline_workers  # noqa: E402
import workers  # noqa: E402
from parallel.common import shard_full  # noqa: E402
from parallel.pipeline import virtual_stage_layers  # noqa: E402
from pretrain.config import ConfigError, load_config, validate  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402

GRAD_RTOL = 1e-5
CURVE_RTOL = 2e-4  # as tests/parallel/test_parallel.py: Adam amplifies rounding-level differences
NORM_RTOL = 2e-3  # grad norms after the first update (the first one: GRAD_RTOL)
# tp=2 with sequence parallelism over 3 accumulated micro-batches puts A_log's small, cancelling
# gradient at 1.16e-5 from the single process; the same run at pp=1 gives the identical 1.1634e-5
# (measured), so that is tp's summation order, not the pipeline's
GRAD_RTOL_CASE = {"tp2_pp2_sp": 2e-5}

TWO_RANK_CASES = {
    "pp2_1f1b": (["parallel.pp=2", "data.global_batch_size=8"], 20),
    "pp2_bars_softmax_aux_zloss": (["parallel.pp=2", "model.pattern=ME|*-M", "model.moe.router=softmax_aux",
                                    "trainer.z_loss_coeff=1e-3", "data.global_batch_size=6"], 6),
    "pp2_vpp2_interleaved": (["parallel.pp=2", "parallel.virtual_pp=2", "data.global_batch_size=8"], 20),
    "pp2_tied_embeddings": (["parallel.pp=2", "model.tie_embeddings=true", "data.global_batch_size=6"], 6),
    # tp = cp = 1: the last stage hands its hidden states to the chunked loss (ParallelHybridLM.stage_loss)
    "pp2_chunked_loss": (["parallel.pp=2", "data.global_batch_size=8", "trainer.loss_chunk_tokens=10"], 5),
}
FOUR_RANK_CASES = {
    # experts over the 2 dp replicas (expert dp 1 != dense dp 2: needs the pipeline-last rank order)
    "pp2_dp2_ep2": (["parallel.pp=2", "parallel.ep=2", "data.global_batch_size=8"], 20),
    "tp2_pp2_sp": (["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                    "data.global_batch_size=6"], 6),
    # each stage's layers see sequence shards (the loss's cp factor meets the pipeline's loss scaling);
    # experts over the 2 cp ranks; an MoE layer on each stage, the softmax router's aux loss over cp
    "pp2_cp2_ep2_softmax_aux": (["parallel.pp=2", "parallel.cp=2", "parallel.ep=2", "model.pattern=ME|*-E",
                                 "model.moe.router=softmax_aux", "data.global_batch_size=4"], 6),
}
EIGHT_RANK_CASES = {
    "tp2_pp2_ep2_sp": (["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.sequence_parallel=true",
                        "data.global_batch_size=8"], 4),
}
# saved at pp=2 (4 micro-batches per step), loaded at pp=1 x dp=2
RELOAD_CASE = (["parallel.pp=2", "data.global_batch_size=8"], ["data.global_batch_size=4"])
EXPECTED_LAYERS = {"pp2_1f1b": [["0", "1"], ["2", "3"]], "pp2_bars_softmax_aux_zloss": [["0", "1"], ["2", "3", "4"]]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "pp2")
    return run_ranks(pipeline_workers.two_rank_launch, 2, list(TWO_RANK_CASES.values()), ckpt, RELOAD_CASE)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(pipeline_workers.run_cases, 4, list(FOUR_RANK_CASES.values()))


@pytest.fixture(scope="module")
def eight_ranks():
    return run_ranks(pipeline_workers.run_cases, 8, list(EIGHT_RANK_CASES.values()))


def _check_case(name: str, overrides: list[str], per_rank: list[dict]) -> None:
    cfg = load_config([], workers.BASE + overrides)
    routed = cfg.data.global_batch_size * cfg.data.seq_len * cfg.model.moe.top_k
    for rank, result in enumerate(per_rank):
        assert result["loss_err"] < GRAD_RTOL, (name, rank, result["loss_err"])
        assert result["grad_err"], (name, rank, "no gradients compared")
        for param, err in result["grad_err"].items():
            limit = workers.grad_limit(GRAD_RTOL_CASE.get(name, GRAD_RTOL), result["ref_fp32_err"][param])
            assert err < limit, (name, rank, param, err, result["ref_fp32_err"][param])
        np.testing.assert_allclose(result["curve"], result["curve_ref"], rtol=CURVE_RTOL, err_msg=name)
        np.testing.assert_allclose(result["grad_norm"][0], result["grad_norm_ref"][0], rtol=GRAD_RTOL, err_msg=name)
        np.testing.assert_allclose(result["grad_norm"], result["grad_norm_ref"], rtol=NORM_RTOL, err_msg=name)
        # every element once in the norm: split over stages, tied embeddings, experts over ep
        workers.check_ones_norm(name, result)
        assert result["moe_load"][0] == result["moe_load_ref"][0], name
        for loads in result["moe_load"]:
            assert len(loads) == len(result["moe_load_ref"][0]) and all(sum(layer) == routed for layer in loads), name
        assert result["num_parameters"] == result["ref_num_parameters"], name
    # together the pipeline ranks compared every parameter of the model
    assert sorted({p for r in per_rank for p in r["grad_err"]}) == per_rank[0]["ref_names"], name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWO_RANK_CASES))
def test_two_ranks_match_single_process(two_ranks, name):
    index = list(TWO_RANK_CASES).index(name)
    per_rank = [rank["cases"][index] for rank in two_ranks]
    _check_case(name, TWO_RANK_CASES[name][0], per_rank)
    if name in EXPECTED_LAYERS:
        assert [r["layers"] for r in per_rank] == EXPECTED_LAYERS[name]
    if name == "pp2_vpp2_interleaved":
        assert [r["chunks"] for r in per_rank] == [2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FOUR_RANK_CASES))
def test_four_ranks_match_single_process(four_ranks, name):
    index = list(FOUR_RANK_CASES).index(name)
    _check_case(name, FOUR_RANK_CASES[name][0], [rank[index] for rank in four_ranks])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EIGHT_RANK_CASES))
def test_eight_ranks_match_single_process(eight_ranks, name):
    index = list(EIGHT_RANK_CASES).index(name)
    _check_case(name, EIGHT_RANK_CASES[name][0], [rank[index] for rank in eight_ranks])


@pytest.mark.slow
def test_pp2_checkpoint_reloads_at_pp1(two_ranks):
    """Each pipeline rank saves its own layers under their global names; at pp=1 every rank loads
    the whole model with exactly the saved weights (MoE expert_bias included)."""
    saved = {}
    for rank in two_ranks:
        for name, (tensor, _) in rank["reload"]["saved"].items():
            assert name not in saved, name  # a layer lives on one pipeline stage only
            saved[name] = tensor
    saved_keys = sorted({k for rank in two_ranks for k in rank["reload"]["saved_keys"]})
    for rank in two_ranks:
        assert rank["reload"]["loaded_keys"] == saved_keys  # checkpoint keys do not depend on pp
        loaded = rank["reload"]["loaded"]
        assert sorted(loaded) == sorted(saved)
        for name, (tensor, spec) in loaded.items():
            assert torch.equal(tensor, shard_full(saved[name], spec)), name


@pytest.mark.slow
def test_the_schedules_ran_with_cpu_compat_s_stand_in(two_ranks):
    """parallel.cpu_compat (the one module that patches a library) covers the schedules' CUDA-only call."""
    assert two_ranks[0]["schedules_torch_stand_in"]


def test_virtual_stage_layers():
    assert virtual_stage_layers((4,), 2) == [range(0, 2), range(2, 4)]
    assert virtual_stage_layers((2, 3), 2) == [range(0, 2), range(2, 5)]
    assert virtual_stage_layers((1, 1, 2, 3), 2) == [range(0, 2), range(2, 7)]
    assert virtual_stage_layers((8,), 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


@pytest.mark.parametrize("overrides, match", [
    (["model.pattern=M*-", "parallel.pp=2"], r"model.pattern='M\*-': 3 layers cannot be split evenly into parallel.pp=2"),
    (["model.pattern=M|*|-", "parallel.pp=2"], r"model.pattern='M\|\*\|-': has 3 '\|'-separated stages, not a multiple of parallel.pp=2"),
    (["parallel.pp=2", "parallel.virtual_pp=2", "model.pattern=M*-EM*"],
     r"6 layers cannot be split evenly into parallel.pp=2 x parallel.virtual_pp=2=4"),
    (["parallel.virtual_pp=2"], r"parallel.virtual_pp=2: needs parallel.pp > 1"),
    (["parallel.pp=2", "parallel.virtual_pp=2", "data.global_batch_size=6"],
     r"data.global_batch_size=6: gives 3 micro-batches per step; the interleaved schedule"),
])
def test_impossible_stages_are_clear_errors(overrides, match):
    cfg = load_config([], workers.BASE + overrides)
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size=2)


def _train_demo(run_dir, steps: int, name: str = "pp2", pp: int = 2, extra: tuple[str, ...] = ()) -> list[float]:
    """The real trainer (python -m pretrain.train, under torchrun at pp > 1) on the CPU demo (8 layers,
    tied embeddings: 4 layers per stage, the MoE layer on the second stage only); returns the losses
    in metrics.jsonl, which must hold every step once."""
    import json
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TMPDIR": str(run_dir), "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(pp)]
              if pp > 1 else [sys.executable])
    cmd = [*launch, "-m", "pretrain.train", "--config", "configs/demo.yaml", f"trainer.max_steps={steps}",
           "trainer.log_interval=1", f"run.dir={run_dir}", f"run.name={name}", "checkpoint.interval=0",
           "checkpoint.async_save=false", f"parallel.pp={pp}", *extra]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(train[0]["step"], steps + 1))
    return [r["loss"] for r in train]


def _eval_losses(run_dir, name: str) -> dict[int, float]:
    import json

    records = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}


# evaluation every 3 steps on 2 micro-batches of the demo data itself (forward-only schedule at pp=2)
EVAL = ("trainer.eval_interval=3", "trainer.eval_steps=2", "data.validation.path=.cache/demo_data/bytes_256")


@pytest.mark.slow
def test_trainer_pp2_follows_the_single_process_demo_and_resumes_at_pp2_and_pp1(tmp_path):
    """3 steps at pp=2 through the real trainer (the checkpoint is saved at pp=2; the first stage has
    no MoE layer, so its expert optimizer is empty), then two resumed runs to step 6 from that
    checkpoint: at pp=2 and in one process (pp=1, model and Adam state resharded). All logged losses
    equal the single-process demo's golden losses; both continuations agree with each other, and so
    do their evaluations (forward-only pipeline schedule at pp=2) at step 6."""
    import json
    import platform

    assert len(_train_demo(tmp_path, 3, extra=EVAL)) == 3
    ckpt = tmp_path / "pp2" / "checkpoints" / "step_00000003"
    losses = _train_demo(tmp_path, 6, extra=EVAL)  # resumes from step 3 (resume=auto); metrics.jsonl: steps 1-6
    at_pp1 = _train_demo(tmp_path, 6, name="pp1", pp=1, extra=(f"checkpoint.resume={ckpt}", *EVAL))
    print("pp2 trainer losses:", losses, "resumed at pp1:", at_pp1)
    assert at_pp1 == pytest.approx(losses[3:], rel=1e-5)  # float32: stage-wise vs whole-model summation order
    evals_pp2, evals_pp1 = _eval_losses(tmp_path, "pp2"), _eval_losses(tmp_path, "pp1")
    assert sorted(evals_pp2) == [3, 6] and sorted(evals_pp1) == [6]
    assert evals_pp2[6] == pytest.approx(evals_pp1[6], rel=1e-5)
    golden_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pretrain", "golden_demo_losses.json")
    golden = json.loads(open(golden_path).read())
    if golden["environment"] != {"python": platform.python_version(), "torch": torch.__version__.split("+")[0]}:
        pytest.skip(f"golden losses were recorded with {golden['environment']}")
    assert losses == pytest.approx(golden["losses"][:6], rel=2e-4, abs=2e-4)
