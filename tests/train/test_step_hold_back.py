"""The hold-back of a training step (hnmix.train.step, hnmix.train.hold_back): `MoCo.forward(...,
enqueue=False)` leaves the queue alone and hands over the global batch of keys, and the BatchNorm
running statistics the forward updated are kept or restored once the guard has decided. A kept
step equals a plain forward (which enqueues at once); a skipped one leaves queue and statistics
bit for bit as they were, also when its keys and statistics are NaN."""

import copy

import pytest
import torch
from accelerate import Accelerator

from hnmix.moco import MoCo, MoCoEncoder
from hnmix.train.hold_back import batchnorm_statistics, restore_batchnorm_statistics, save_batchnorm_statistics
from hnmix.train.metrics import RunningCount, StatsWindow
from hnmix.train.optim import NonFiniteGuard
from hnmix.train.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: 1 thread is faster


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def small_moco(arch="test_resnet", **overrides):
    torch.manual_seed(0)
    options = dict(dim_moco=16, k_moco=32, m_moco=0.9, t_moco=0.2, n_hard=8, s1_hard=4, s2_hard=4) | overrides
    return MoCo(MoCoEncoder(arch, options["dim_moco"]), **options)


def held_back_step(moco, view_q, view_k, ids, keep: bool) -> None:
    """A forward held back, then what `TrainStep` does once the guard decided `keep`."""
    saved = save_batchnorm_statistics(batchnorm_statistics(moco))
    _, _, keys = moco(view_q, view_k, ids, enqueue=False)
    moco.queue.enqueue(*keys, apply=torch.tensor(keep))
    restore_batchnorm_statistics(batchnorm_statistics(moco), saved, unless=torch.tensor(keep))


def test_a_held_back_step_enqueues_and_keeps_bn_statistics_only_when_applied():
    x1, x2, ids = images(4, 1), images(4, 2), torch.arange(4)
    kept, skipped, plain = small_moco(), small_moco(), small_moco()
    queue_before = copy.deepcopy(skipped.queue.state_dict())
    statistics_before = [b.clone() for b in batchnorm_statistics(skipped)]
    assert statistics_before  # test_resnet has BatchNorm in both encoders
    held_back_step(kept, x1, x2, ids, keep=True)
    held_back_step(skipped, x1, x2, ids, keep=False)
    plain(x1, x2, ids)  # enqueue=True: what a kept step must equal
    for name, value in skipped.queue.state_dict().items():
        assert torch.equal(value, queue_before[name]), name
    for buffer, before in zip(batchnorm_statistics(skipped), statistics_before):
        assert torch.equal(buffer, before)
    for name, value in kept.queue.state_dict().items():
        assert torch.equal(value, plain.queue.state_dict()[name]), name
    for buffer, reference in zip(batchnorm_statistics(kept), batchnorm_statistics(plain)):
        assert torch.equal(buffer, reference)
    assert not all(torch.equal(a, b) for a, b in zip(batchnorm_statistics(kept), statistics_before))


def test_a_forward_that_does_not_enqueue_leaves_the_queue_and_returns_the_global_batch():
    moco = small_moco()
    queue_before = copy.deepcopy(moco.queue.state_dict())
    ids, labels = torch.arange(4) + 10, torch.arange(4) % 2
    loss, stats, (keys, key_ids, key_labels) = moco(images(4, 1), images(4, 2), ids, labels, enqueue=False)
    for name, value in moco.queue.state_dict().items():
        assert torch.equal(value, queue_before[name]), name
    assert keys.shape == (4, 16) and torch.equal(key_ids, ids) and torch.equal(key_labels, labels)
    assert moco(images(4, 1), images(4, 2), ids, enqueue=False)[2][2] is None  # no labels: none to enqueue
    loss.backward()  # the logits read the queue itself: the backward comes before the enqueue
    moco.queue.enqueue(keys, key_ids, key_labels)
    assert moco.queue.ptr.item() == 4 and torch.equal(moco.queue.ids[:4], ids)


def test_a_nan_step_held_back_leaves_no_nan_in_the_queue_or_statistics():
    moco = small_moco()
    nan_images = images(4, 1) * float("nan")
    held_back_step(moco, nan_images, nan_images, torch.arange(4), keep=False)
    assert torch.isfinite(moco.queue.keys).all() and moco.queue.ptr.item() == 0
    assert all(torch.isfinite(b.float()).all() for b in batchnorm_statistics(moco))


def test_a_skipped_step_leaves_the_split_statistics_as_they_were():
    """Restoring after a split-BN forward puts back every running statistic and count."""
    torch.manual_seed(0)
    moco = MoCo(MoCoEncoder("test_efficientnet", 16), dim_moco=16, k_moco=32, m_moco=0.9, t_moco=0.2, bn_splits=2)
    before = copy.deepcopy(moco.state_dict())
    x = images(4, 1)
    saved = save_batchnorm_statistics(batchnorm_statistics(moco))
    moco(x, x.flip(0), torch.arange(4), enqueue=False)
    assert not all(torch.equal(b, before[n]) for n, b in moco.named_buffers() if "running_mean" in n)
    restore_batchnorm_statistics(batchnorm_statistics(moco), saved, unless=torch.tensor(False))
    for name, buffer in moco.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_a_model_without_batchnorm_has_nothing_to_save_or_restore():
    moco = MoCo(MoCoEncoder("test_vit", 16, img_size=32), dim_moco=16, k_moco=16, m_moco=0.9, t_moco=0.2)
    assert save_batchnorm_statistics(batchnorm_statistics(moco)) is None
    restore_batchnorm_statistics(batchnorm_statistics(moco), None, unless=torch.tensor(False))


def train_step(moco):
    """`TrainStep` over `moco` on one CPU process, with plain SGD."""
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainStep(moco, moco, accelerator, optimizer, scheduler, NonFiniteGuard(optimizer, 3, device="cpu"),
                     StatsWindow(), RunningCount(), momentum_at=lambda step: 0.9, clip_grad=0.0)


def test_the_train_step_enqueues_a_finite_step_and_skips_a_nan_one_whole():
    moco, plain = small_moco(), small_moco()
    step = train_step(moco)
    ids, labels, unreadable = torch.arange(4), torch.arange(4) % 2, torch.zeros(4, dtype=torch.long)
    assert step(images(4, 1), images(4, 2), ids, labels, unreadable, 0).item()
    plain(images(4, 1), images(4, 2), ids, labels)  # the same forward, enqueued at once
    for name, value in moco.queue.state_dict().items():
        assert torch.equal(value, plain.queue.state_dict()[name]), name
    for buffer, reference in zip(batchnorm_statistics(moco), batchnorm_statistics(plain)):
        assert torch.equal(buffer, reference)

    before = copy.deepcopy(moco.state_dict())
    nan_images = images(4, 3) * float("nan")
    assert not step(nan_images, nan_images, ids + 4, labels, unreadable, 1).item()
    for name, value in moco.state_dict().items():  # encoders, statistics and queue
        assert torch.equal(value, before[name]), name
