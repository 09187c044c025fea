"""hnmix.distributed's batch shuffle on one process, the split-BN shuffle: a permutation of the
batch from the global RNG, undone row for row by `batch_unshuffle`. Across ranks (one permutation
broadcast from rank 0) it is checked in tests/method/test_moco_multiprocess.py."""

import torch

from hnmix.distributed import batch_shuffle, batch_unshuffle


def images(n, seed):
    """[n, 3, 4, 4] float32."""
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_one_process_shuffle_is_a_permutation_from_the_global_rng():
    x = images(8, 0)
    torch.manual_seed(3)
    shuffled, order = batch_shuffle(x)
    torch.manual_seed(3)
    assert torch.equal(order, torch.randperm(8))
    assert torch.equal(shuffled, x[order])
    assert sorted(order.tolist()) == list(range(8))


def test_a_new_permutation_every_call():
    torch.manual_seed(0)
    orders = {tuple(batch_shuffle(images(8, 0))[1].tolist()) for _ in range(4)}
    assert len(orders) > 1


def test_unshuffle_puts_each_row_back_at_its_images_position_as_local_and_global_rows():
    x = images(8, 1)
    torch.manual_seed(5)
    shuffled, order = batch_shuffle(x)
    rows = shuffled.flatten(1).sum(1, keepdim=True)  # [8, 1], a function of each image alone
    local, global_rows = batch_unshuffle(rows, order)
    torch.testing.assert_close(local, x.flatten(1).sum(1, keepdim=True), rtol=0, atol=0)
    assert global_rows is local  # one process: this rank's rows are the global batch


def test_one_process_keeps_the_images_dtype_under_autocast():
    """Only images that cross ranks take autocast's dtype: one process leaves the cast to the encoder."""
    x = images(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shuffled, _ = batch_shuffle(x)
    assert shuffled.dtype == torch.float32
