"""MoE under data and expert parallelism on CPU/gloo against the single-process model.

One 2-rank launch (imports cost 10-25 s per rank):
- dp2 with an expert that never gets a token (megatron DDP with overlapped gradient reduction used
  to fail: "Communication call has not been issued for this bucket" / a bucket reset assertion);
- ep2 (experts 0-1 on rank 0, 2-3 on rank 1, megatron-core's all-to-all dispatcher) with the sigmoid
  router + expert bias and a shared expert; the softmax router + aux loss with SwiGLU experts; a
  capacity factor that drops slots; the starved expert again, now across the all-to-all;
- megatron's TopKRouter configured from ours: softmax before the top k (un-normalised gate weights;
  always at top_k 1), routed_scaling_factor, sigmoid at top_k 1;
- an ep2 -> ep1 checkpoint reload (expert weights keyed by global expert index).
One 4-rank launch: tp2 x ep2 with sequence parallelism, both routers.
The parallel build routes with megatron-core's TopKRouter, the reference with its own router.
For each parity case: loss and every gradient after one step equal the single-process run (relative
1e-5, float32), 20 steps of training (distributed optimizer with expert-dp groups, clipping at 1.0)
give the same loss curve and gradient norms (2e-4; the first step's norm 1e-5), the per-expert load equals the reference's and sums to
routed tokens x top_k, dropped-slot counts equal the reference's, parameter counts are ep-independent.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import workers  # noqa: E402
from parallel.common import shard_full  # noqa: E402
from pretrain.config import ConfigError, load_config, validate  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402

GRAD_RTOL = 1e-5
CURVE_RTOL = 2e-4  # see test_parallel.py: Adam amplifies rounding-level differences over 20 steps
STEPS = 20

DP2 = ["data.global_batch_size=4"]
EP2 = ["parallel.ep=2", "data.global_batch_size=4"]
CASES = {
    "dp2_empty_expert": (DP2, STEPS, "starve_expert_3"),
    "ep2_sigmoid_shared": (EP2, STEPS),
    "ep2_softmax_aux_swiglu_shared": (EP2 + ["model.moe.router=softmax_aux", "model.moe.activation=swiglu"], STEPS),
    "ep2_capacity_factor": (EP2 + ["model.moe.capacity_factor=1.0", "model.moe.num_shared_experts=0"], STEPS),
    "ep2_empty_expert": (EP2, STEPS, "starve_expert_3"),
    # megatron's TopKRouter settings from ours: softmax before the top k (un-normalised, and always at k=1), scaling
    "dp2_softmax_unnormalised_scaled": (DP2 + ["model.moe.router=softmax_aux", "model.moe.norm_topk_prob=false",
                                                "model.moe.routed_scaling_factor=2.5"], 5),
    "ep2_softmax_top1": (EP2 + ["model.moe.router=softmax_aux", "model.moe.top_k=1"], 5),
    "ep2_sigmoid_top1_scaled": (EP2 + ["model.moe.top_k=1", "model.moe.routed_scaling_factor=2.5"], 5),
}
TP2_EP2 = ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true", "data.global_batch_size=4"]
FOUR_RANK_CASES = {  # tp-cp-ep-dp-pp: tp groups (0,1) (2,3); ep groups (0,2) (1,3); dp = 2
    "tp2_ep2_sp_sigmoid_shared": (TP2_EP2, STEPS),
    "tp2_ep2_sp_softmax_aux_swiglu": (TP2_EP2 + ["model.moe.router=softmax_aux", "model.moe.activation=swiglu",
                                                 "model.moe.num_shared_experts=0"], 5),
}
# saved at ep=2 (dp=2), loaded at ep=1 (dp=2)
RELOAD = (EP2 + ["optim.grad_clip=0"], DP2 + ["optim.grad_clip=0"])


def two_rank_launch(rank: int, world: int, cases: list, ckpt_dir: str) -> dict:
    return {"cases": workers.run_cases(rank, world, cases),
            "reload": workers.save_and_reload(rank, world, ckpt_dir, *RELOAD),
            "cpu_compat": workers.cpu_compat_report()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "ep2")
    return run_ranks(two_rank_launch, 2, list(CASES.values()), ckpt)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(workers.run_cases, 4, list(FOUR_RANK_CASES.values()))


def _check(name: str, per_rank: list[dict]) -> None:
    for rank, result in enumerate(per_rank):
        assert result["loss_err"] < GRAD_RTOL, (name, rank, result["loss_err"])
        for param, err in result["grad_err"].items():
            limit = workers.grad_limit(GRAD_RTOL, result["ref_fp32_err"][param])
            assert err < limit, (name, rank, param, err, result["ref_fp32_err"][param])
        np.testing.assert_allclose(result["curve"], result["curve_ref"], rtol=CURVE_RTOL, err_msg=name)
        # the norm clipping sees covers dense and expert grads over all groups
        np.testing.assert_allclose(result["grad_norm"][0], result["grad_norm_ref"][0], rtol=GRAD_RTOL, err_msg=name)
        np.testing.assert_allclose(result["grad_norm"], result["grad_norm_ref"], rtol=CURVE_RTOL, err_msg=name)
        assert result["num_parameters"] == result["ref_num_parameters"], name
        assert result["megatron_routers"], name  # the parallel build routes with megatron-core's TopKRouter
        workers.check_ones_norm(name, result)  # experts over ep, expert dp and tp


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_moe_matches_single_process(two_ranks, name):
    _check(name, [rank["cases"][list(CASES).index(name)] for rank in two_ranks])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_moe_load_sums_to_routed_slots(two_ranks, name):
    """moe_load (the trainer's record): per step and layer, routed slots per expert over the global
    batch; sums to tokens x top_k and equals the single-process count (early steps, before the
    trajectories can diverge by rounding). Dropped slots likewise."""
    result = two_ranks[0]["cases"][list(CASES).index(name)]
    for step in range(3):
        for load, load_ref in zip(result["moe_load"][step], result["moe_load_ref"][step]):
            assert sum(load) == result["routed_slots_per_step"], (name, step, load)
            assert load == load_ref, (name, step)
        assert result["moe_dropped"][step] == result["moe_dropped_ref"][step], (name, step)
    if name.endswith("empty_expert"):
        assert all(layer[3] == 0 for step in result["moe_load"] for layer in step)
    dropped = sum(sum(layer) for step in result["moe_dropped"] for layer in step)
    assert (dropped > 0) == ("capacity" in name), (name, dropped)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FOUR_RANK_CASES))
def test_tp2_x_ep2_matches_single_process(four_ranks, name):
    """Experts sliced over tp and spread over ep: the dispatcher all-gathers sequence shards over
    expert-tp (uneven, via cpu_compat on gloo) after the all-to-all over ep."""
    index = list(FOUR_RANK_CASES).index(name)
    per_rank = [rank[index] for rank in four_ranks]
    _check(name, per_rank)
    result = per_rank[0]
    for load, load_ref in zip(result["moe_load"][0], result["moe_load_ref"][0]):
        assert sum(load) == result["routed_slots_per_step"] and load == load_ref, name


@pytest.mark.slow
def test_ep2_checkpoint_reloads_at_ep1(two_ranks):
    """Model (expert weights under their global index, expert_bias) and distributed optimizer saved
    at ep=2 load exactly at ep=1 x dp=2; the optimizer state loads and steps."""
    loaded = two_ranks[0]["reload"]["loaded_before_step"]
    experts_seen = set()
    for rank in two_ranks:
        for name, (piece, spec) in rank["reload"]["saved"].items():
            assert torch.equal(shard_full(loaded[name], spec), piece), name
            if ".experts." in name:
                experts_seen.add(name.split(".experts.")[1].split(".")[0])
    assert experts_seen == {"0", "1", "2", "3"}
    assert "loaded_after_step" in two_ranks[0]["reload"]


@pytest.mark.slow
def test_cpu_compat_has_the_dispatcher_stand_in(two_ranks):
    assert "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu" in \
        two_ranks[0]["cpu_compat"]["patched"]


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.ep=3"], 6, r"model.moe.num_experts=4: must be divisible by parallel.ep=3"),
    (["parallel.ep=4", "parallel.tp=2", "parallel.sequence_parallel=true"], 4, r"parallel.ep=4: must divide dp\*cp=2"),
    (["parallel.ep=2", "parallel.tp=2"], 4, r"parallel.sequence_parallel=False: must be true when parallel.ep=2"),
    (["model.moe.capacity_factor=0"], 1, r"model.moe.capacity_factor=0.0: must be > 0"),
])
def test_expert_parallel_config_errors(overrides, world, message):
    cfg = load_config([], workers.BASE + overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world)
