"""MoCo on 2 real CPU processes (accelerate launch): identical queues, shuffle BN un-shuffles."""

import pytest
import torch

from launch import REPO, accelerate_launch

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    result = accelerate_launch([str(REPO / "tests/multiprocess/moco_two_ranks.py"), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_processes_ran(ranks):
    assert [r["world"] for r in ranks] == [2, 2]


def test_queues_are_bit_identical_on_both_ranks(ranks):
    for name in ("keys", "ids", "labels", "ptr"):
        assert torch.equal(ranks[0]["queue"][name], ranks[1]["queue"][name]), name


def test_queue_holds_the_keys_of_both_ranks_samples_in_rank_order(ranks):
    queue = ranks[0]["queue"]
    batch, steps = 4, 3
    assert queue["ptr"].item() == steps * 2 * batch % queue["ids"].numel()
    expected = torch.cat([torch.cat([ranks[r]["fed_ids"][s * batch : (s + 1) * batch] for r in range(2)])
                          for s in range(steps)])
    assert torch.equal(queue["ids"][: steps * 2 * batch], expected)
    assert torch.equal(queue["labels"][: steps * 2 * batch], expected % 3)


def test_shuffle_bn_mixes_ranks_and_unshuffles_each_sample_to_its_own_key(ranks):
    assert sum(r["cross_rank_images"] for r in ranks) > 0
    for r in ranks:
        assert r["unshuffle_error"] < 1e-5
        assert r["global_matches_local"]


def test_under_bf16_autocast_images_cross_ranks_in_bf16_and_keys_stay_float32(ranks):
    for r in ranks:
        assert r["bf16_exchanged_dtype"] == torch.bfloat16
        assert r["bf16_key_dtypes"] == (torch.float32, torch.float32)
        assert r["bf16_unshuffle_error"] < 1e-5  # the encoder casts to bf16 either way: nothing lost


def test_batch_shuffle_deals_one_broadcast_permutation_of_the_global_batch_and_unshuffle_undoes_it(ranks):
    batch = 4
    order = ranks[0]["shuffle"]["order"]
    assert torch.equal(ranks[1]["shuffle"]["order"], order)  # rank 0's draw, whatever each rank's RNG
    assert sorted(order.tolist()) == list(range(2 * batch))
    for rank, r in enumerate(ranks):
        # Rank r encodes the images at positions order[r * B : (r + 1) * B] of the global batch.
        assert r["shuffle"]["rows"].squeeze(1).tolist() == order[rank * batch : (rank + 1) * batch].tolist()
        assert torch.equal(r["shuffle"]["global"].squeeze(1), 10 * torch.arange(2 * batch).float())
        assert torch.equal(r["shuffle"]["local"], r["shuffle"]["global"][rank * batch : (rank + 1) * batch])


def test_mixing_draws_differ_between_ranks_and_repeat_for_the_same_step_and_rank(ranks):
    for name in ("logit_type1", "logit_type2"):
        assert ranks[0]["mixing_first"][name] != ranks[1]["mixing_first"][name], name
    # The real logits are the same on both ranks: only the draws differ.
    assert ranks[0]["mixing_first"]["logit_pos"] == ranks[1]["mixing_first"]["logit_pos"]
    for r in ranks:
        assert r["mixing_first"] == r["mixing_again"]
