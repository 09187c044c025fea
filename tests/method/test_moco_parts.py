"""The parts of hnmix.moco below `MoCo.forward`: wrappers, split BatchNorm, the queue, the encoder,
the mixing seeds. Values are worked out by hand where they can be."""

import copy
import random
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hnmix.moco import MoCoEncoder, mixing_generator, unwrap
from hnmix.key_queue import KeyQueue, validate_queue_size
from hnmix.split_bn import convert_split_batchnorm

EPS = 1e-5  # BatchNorm's default eps


def rows(n, d, seed):
    """[n, d] float32 normal."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- wrappers


class DataParallelLike(nn.Module):
    """Holds the model as `.module`, like DistributedDataParallel."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class CompiledLike(nn.Module):
    """Holds the model as `._orig_mod`, like torch.compile's OptimizedModule."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_unwrap_takes_off_ddp_and_compile_wrappers_in_any_order():
    inner = nn.Linear(2, 2)
    assert unwrap(inner) is inner
    assert unwrap(DataParallelLike(inner)) is inner
    assert unwrap(CompiledLike(inner)) is inner
    assert unwrap(DataParallelLike(CompiledLike(inner))) is inner
    assert unwrap(CompiledLike(DataParallelLike(inner))) is inner


# ----------------------------------------------------------------------------- split BatchNorm


def test_split_batchnorm_without_running_statistics_normalises_the_whole_batch():
    bn = nn.BatchNorm1d(4, track_running_stats=False)
    split = convert_split_batchnorm(copy.deepcopy(bn), 2)
    x = rows(8, 4, 0) * 3 + torch.arange(8.0).unsqueeze(1)  # the halves have different statistics
    expected = (x - x.mean(0)) / (x.var(0, unbiased=False) + EPS).sqrt()
    torch.testing.assert_close(split(x), expected)


def test_split_batchnorm_in_eval_mode_uses_the_running_statistics_and_leaves_them_alone():
    bn = nn.BatchNorm1d(4)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    split = convert_split_batchnorm(bn, 2).eval()
    x = rows(8, 4, 1)
    torch.testing.assert_close(split(x), (x - 0.5) / (2.0 + EPS) ** 0.5)
    assert split.num_batches_tracked.item() == 0
    assert (split.running_mean == 0.5).all() and (split.running_var == 2.0).all()


def test_split_batchnorm_refuses_a_batch_its_splits_do_not_divide():
    split = convert_split_batchnorm(nn.BatchNorm1d(8), 4)  # 8 channels: divisible, the batch of 6 is not
    with pytest.raises(ValueError, match=r"^bn_splits=4 must divide the batch size 6$"):
        split(rows(6, 8, 2))


def test_split_batchnorm_cumulative_running_statistics_are_the_mean_of_the_groups():
    """momentum=None is BatchNorm's cumulative average: after step t each group's update is
    old + (batch statistic - old) / t; the layer keeps the mean of the groups' updates."""
    split = convert_split_batchnorm(nn.BatchNorm1d(3, momentum=None), 2)
    first, second = rows(8, 3, 3) * 2 + 1, rows(8, 3, 4) - 1
    split(first)
    means = torch.stack([half.mean(0) for half in first.chunk(2)])
    variances = torch.stack([half.var(0) for half in first.chunk(2)])  # unbiased, as BatchNorm keeps it
    torch.testing.assert_close(split.running_mean, means.mean(0))
    torch.testing.assert_close(split.running_var, variances.mean(0))
    split(second)
    means_2 = torch.stack([means.mean(0) + (half.mean(0) - means.mean(0)) / 2 for half in second.chunk(2)])
    variances_2 = torch.stack([variances.mean(0) + (half.var(0) - variances.mean(0)) / 2 for half in second.chunk(2)])
    torch.testing.assert_close(split.running_mean, means_2.mean(0))
    torch.testing.assert_close(split.running_var, variances_2.mean(0))
    assert split.num_batches_tracked.item() == 2


def test_split_batchnorm_running_variance_with_momentum_by_hand():
    split = convert_split_batchnorm(nn.BatchNorm1d(3), 2)  # momentum 0.1 from running_var = 1
    x = rows(8, 3, 5) * torch.tensor([0.5, 1.0, 3.0])
    split(x)
    expected = torch.stack([0.9 + 0.1 * half.var(0) for half in x.chunk(2)]).mean(0)
    torch.testing.assert_close(split.running_var, expected)


def test_one_split_is_plain_batchnorm_and_fewer_are_refused():
    one = convert_split_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), 1)
    x = rows(4, 3, 6)
    torch.testing.assert_close(one(x), (x - x.mean(0)) / (x.var(0, unbiased=False) + EPS).sqrt())
    with pytest.raises(ValueError, match=r"^bn_splits must be >= 1, got 0$"):
        convert_split_batchnorm(nn.BatchNorm1d(3), 0)


# ----------------------------------------------------------------------------- queue


def test_queue_takes_a_global_batch_of_one():
    queue = KeyQueue(3, 2)
    queue.enqueue(F.normalize(rows(1, 2, 7), dim=1), torch.tensor([7]), torch.tensor([1]))
    assert queue.ptr.item() == 1 and queue.ids.tolist() == [7, -1, -1] and queue.labels.tolist() == [1, -1, -1]


def test_queue_takes_global_batches_of_another_size_mid_run():
    """A run resumed on another number of processes enqueues global batches of another size."""
    queue = KeyQueue(12, 2)
    for count, first_id in ((4, 0), (2, 4), (6, 6)):
        queue.enqueue(F.normalize(rows(count, 2, first_id), dim=1), torch.arange(count) + first_id)
    assert queue.ptr.item() == 0 and queue.ids.tolist() == list(range(12))


@pytest.mark.parametrize(
    "queue_size,batch,suggested",
    [(6, 4, 4), (10, 4, 8), (2, 4, 4)],  # the largest multiple not above k_moco, at least one batch
)
def test_a_queue_size_the_batch_does_not_divide_names_a_size_that_works(queue_size, batch, suggested):
    with pytest.raises(ValueError, match=rf"; try k_moco={suggested}$"):
        validate_queue_size(queue_size, batch)


def test_queue_starts_from_unit_gaussians_of_a_generator_seeded_zero_whatever_the_global_rng():
    torch.manual_seed(123)
    queue = KeyQueue(8, 4)
    expected = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert torch.equal(queue.keys, expected)
    assert queue.ids.dtype == queue.labels.dtype == torch.long


def test_queue_fingerprint_is_a_sha256_that_changes_with_every_buffer():
    fingerprint = KeyQueue(8, 4).fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", fingerprint)
    assert KeyQueue(8, 4).fingerprint() == fingerprint
    changes = [
        lambda q: q.keys[3].neg_(),
        lambda q: q.ids.__setitem__(5, 2),
        lambda q: q.labels.__setitem__(0, 1),
        lambda q: q.ptr.fill_(4),
    ]
    for change in changes:
        queue = KeyQueue(8, 4)
        change(queue)
        assert queue.fingerprint() != fingerprint
        again = KeyQueue(8, 4)
        again.load_state_dict(queue.state_dict())
        assert again.fingerprint() == queue.fingerprint()


# ----------------------------------------------------------------------------- encoder


def test_encoder_backbone_is_timms_random_initialisation_by_default():
    torch.manual_seed(0)
    encoder = MoCoEncoder("test_resnet", 8)
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", num_classes=0)
    expected = reference.state_dict()
    for name, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, expected[name]), name


def _first_conv_weight(encoder):
    return next(m.weight for m in encoder.backbone.modules() if isinstance(m, nn.Conv2d))


def test_conv_encoders_run_channels_last_unless_told_otherwise():
    auto = MoCoEncoder("test_resnet", 8)
    assert auto.memory_format == torch.channels_last
    weight = _first_conv_weight(auto)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    plain = MoCoEncoder("test_resnet", 8, channels_last=False)
    assert plain.memory_format == torch.contiguous_format and _first_conv_weight(plain).is_contiguous()


# ----------------------------------------------------------------------------- mixing seeds


def test_mixing_generators_are_seeded_with_distinct_63_bit_seeds_per_seed_step_and_rank():
    cpu = torch.device("cpu")
    seeds = {(s, t, r): mixing_generator(s, t, r, cpu).initial_seed()
             for s in range(3) for t in range(4) for r in range(3)}
    assert all(0 <= value < 2**63 for value in seeds.values())  # fits an int64
    assert len(set(seeds.values())) == len(seeds)
    assert mixing_generator(1, 2, 0, cpu).initial_seed() == seeds[(1, 2, 0)]
    # A resumed run draws what the uninterrupted one did: the seed is a function of the three numbers only.
    random.seed(5)
    torch.manual_seed(5)
    assert mixing_generator(2, 3, 1, cpu).initial_seed() == seeds[(2, 3, 1)]
