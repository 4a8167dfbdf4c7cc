"""A save starts only when every rank has its state: a rank that fails to collect it (an exception in
megatron's sharded_state_dict, say) must not leave the other ranks waiting in the save's collectives.
Two gloo ranks run Checkpointer._sharded_state_on_every_rank with a state builder that fails on one."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.distributed.spawn import run_ranks  # noqa: E402


class _OneRank:
    """What _sharded_state_on_every_rank uses of a Checkpointer: its rank and the state builder."""

    def __init__(self, rank: int, failing_rank: int | None):
        self.rank, self.failing_rank = rank, failing_rank

    def _sharded_state(self, trainer) -> dict:
        if self.rank == self.failing_rank:
            raise AssertionError("no step in an empty optimizer")
        return {"model": f"state of rank {self.rank}"}


def _collect(rank: int, world: int, failing_rank: int | None) -> str:
    from pretrain.checkpoint import Checkpointer

    try:
        return repr(Checkpointer._sharded_state_on_every_rank(_OneRank(rank, failing_rank), trainer=None))
    except Exception as err:  # noqa: BLE001 - the test compares what each rank saw
        return f"{type(err).__name__}: {err}"


def test_every_rank_learns_that_one_rank_could_not_collect_its_state():
    got = run_ranks(_collect, 2, 1)
    assert got == ["CheckpointError: collecting the state to save failed on rank 1: "
                   "AssertionError: no step in an empty optimizer",
                   "AssertionError: no step in an empty optimizer"]


def test_every_rank_goes_on_to_save_when_all_collected_their_state():
    assert run_ranks(_collect, 2, None) == ["{'model': 'state of rank 0'}", "{'model': 'state of rank 1'}"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
