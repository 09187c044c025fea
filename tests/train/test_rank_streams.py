"""Two real processes: each rank draws its own random stream for stochastic layers (dropout,
drop-path), while the model, its key encoder and its queue start identical on every rank."""

import pytest
import torch
from tiny_run import TINY

from launch import REPO, accelerate_launch

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_streams")
    result = accelerate_launch([str(REPO / "tests/multiprocess/rank_streams.py"), *TINY, "-bs", "4", "-s", "2",
                                "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0",
                                "-do", str(root / "out")], env={"RANK_STREAMS_DIR": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(root / f"rank{rank}.pt") for rank in (0, 1)]


def test_each_rank_draws_its_own_dropout_and_drop_path_masks(ranks):
    for mask in ("dropout_mask", "drop_path_mask"):
        assert not torch.equal(ranks[0][mask], ranks[1][mask]), mask


def test_both_encoders_and_the_queue_start_identical_on_every_rank(ranks):
    first, second = (rank["initial_state"] for rank in ranks)
    assert first.keys() == second.keys()
    assert {"queue.keys", "queue.ids"} <= first.keys() and any(k.startswith("encoder_k.") for k in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
