"""Several processes agree on a stop without a barrier per step: between agreements a rank's
`StopSignal.requested()` waits for no other rank, and a SIGTERM that reaches one rank stops every
rank at the same step. Run as a script, this file is one rank of the two-process check."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from hnmix.train.preemption import MAX_STEPS_BETWEEN_AGREEMENTS, steps_between_agreements

AHEAD = 50  # calls rank 0 makes while rank 1 makes none
SIGNAL_AT = 20  # rank 1 sends itself SIGTERM at this call after rank 0's run ahead


def test_the_agreements_are_about_agree_every_s_apart_at_the_slowest_pace():
    assert steps_between_agreements(0.01, agree_every_s=1.0) == 100
    assert steps_between_agreements(0.3, agree_every_s=1.0) == 3
    assert steps_between_agreements(5.0, agree_every_s=1.0) == 1  # a slow step: agree after each
    assert steps_between_agreements(0.0, agree_every_s=1.0) == MAX_STEPS_BETWEEN_AGREEMENTS
    assert steps_between_agreements(1e-6, agree_every_s=1.0) == MAX_STEPS_BETWEEN_AGREEMENTS


@pytest.mark.multiprocess
def test_ranks_wait_for_each_other_only_at_agreements_and_stop_at_the_same_step(tmp_path):
    """Rank 0 makes AHEAD calls while rank 1 waits for it to finish them: with an all-reduce per
    call, rank 0 would wait for rank 1 and rank 1 would give up. Then rank 1 alone gets SIGTERM;
    both say stop first at the same call, the next agreement, with one agreement per hundreds of
    calls."""
    from launch import accelerate_launch  # (this file also runs as a rank, where tests/ is not on the path)

    done = accelerate_launch([__file__, str(tmp_path)], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    stops = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    calls, agreements = {int(s[0]) for s in stops}, [int(s[1]) for s in stops]
    assert len(calls) == 1, f"the ranks stopped at different calls: {stops}"
    assert calls.pop() > AHEAD + SIGNAL_AT  # rank 1's signal waited for the next agreement
    assert agreements[0] == agreements[1] <= 3, stops


def _call(stop, calls: list[int]) -> bool:
    time.sleep(0.001)  # a step's work
    calls[0] += 1
    return stop.requested()


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"rank 1: {path.name} did not appear: rank 0 waited for rank 1 between agreements")
        time.sleep(0.01)


def _rank_main(directory: Path) -> None:
    import torch.distributed as dist

    from hnmix.train.preemption import StopSignal

    dist.init_process_group("gloo")  # the rendezvous `accelerate launch` set up
    rank = dist.get_rank()
    ahead = directory / "rank0-ran-ahead"
    calls = [0]
    # Long enough that the steps between agreements outnumber AHEAD + SIGNAL_AT on a loaded machine.
    with StopSignal(agree_every_s=60.0) as stop:
        assert not _call(stop, calls)  # the first call agrees, and sets the pace
        if rank == 0:
            for _ in range(AHEAD):
                assert not _call(stop, calls)
            ahead.touch()
        else:
            _wait_for(ahead, seconds=60)
            for _ in range(AHEAD):
                assert not _call(stop, calls)
        for _ in range(SIGNAL_AT):
            assert not _call(stop, calls)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        while not _call(stop, calls):
            pass
    (directory / f"rank{rank}.txt").write_text(f"{calls[0]} {stop.agreements}\n")
    dist.destroy_process_group()  # as the trainer's end_training does: gloo's threads abort at exit otherwise


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
