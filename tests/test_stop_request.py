"""StopRequest: the ranks agree on whether to stop and on why, at one step boundary."""

from __future__ import annotations

from moba_cp.train.stop_request import StopRequest
from tests.distributed_harness import run_distributed


def _agree(rank, world_size, seen_by):
    """``seen_by``: {rank: reason this rank saw before the boundary}; returns (agreed, reason)."""
    stop = StopRequest()
    try:
        stop.received = seen_by.get(rank)
        return stop.agreed(), stop.reason()
    finally:
        stop.restore()


def test_ranks_agree_on_the_reason_not_only_on_the_stop():
    """A dead launcher seen by rank 1 first (rank 0 checked its parent a moment before it died), or
    a job-wide signal whose arrival rank 0's watcher had not recorded yet, is still what rank 0
    says; a rank's own reason comes first; no reason, no stop."""
    launcher = StopRequest.LAUNCHER_EXITED
    assert run_distributed(_agree, 2, args=({1: launcher},)) == [(True, launcher), (True, launcher)]
    assert run_distributed(_agree, 2, args=({1: "SIGTERM"},)) == [(True, "SIGTERM"), (True, "SIGTERM")]
    assert run_distributed(_agree, 2, args=({0: "SIGINT", 1: launcher},)) == [(True, "SIGINT"), (True, launcher)]
    assert [agreed for agreed, _ in run_distributed(_agree, 2, args=({},))] == [False, False]
