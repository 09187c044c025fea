"""Split BatchNorm (`--bn_splits`) as one batch_norm over the groups laid out as channels: the
same outputs, gradients and running statistics as normalising each contiguous group of the batch
on its own (the oracle: one float64 F.batch_norm per group), for torch's BatchNorm and timm's
BatchNormAct2d, in both memory formats, with momentum and with the cumulative average."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from hnmix.split_bn import _empty_groups, convert_split_batchnorm, deferred_split_statistics

SPLITS = 4
CHANNELS = 3


def batch(n, shape, seed):
    """[n, CHANNELS, *shape] float32 whose samples have different means and scales, so that each
    group of the batch has statistics of its own."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, *shape, generator=generator)
    offsets = torch.randn(n, CHANNELS, *[1] * len(shape), generator=generator) * 3
    scales = torch.rand(n, 1, *[1] * len(shape), generator=generator) * 2 + 0.5
    return x * scales + offsets


def with_random_state(layer, seed):
    """`layer` with random weight, bias and running statistics (not BatchNorm's 1, 0, 0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
        layer.bias.copy_(torch.randn(CHANNELS, generator=generator))
        layer.running_mean.copy_(torch.randn(CHANNELS, generator=generator))
        layer.running_var.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
    return layer


class Float64PerGroup:
    """The oracle: the state of a BatchNorm layer in float64, trained one contiguous group of the
    batch at a time, each group from the same running statistics; the layer keeps their mean."""

    def __init__(self, layer, activation, splits):
        self.weight = None if layer.weight is None else layer.weight.detach().double().requires_grad_()
        self.bias = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
        self.running_mean, self.running_var = layer.running_mean.double(), layer.running_var.double()
        self.count, self.momentum, self.eps = int(layer.num_batches_tracked), layer.momentum, layer.eps
        self.activation, self.splits = activation, splits

    def train_step(self, x):
        """x: [N, C, *spatial] -> the layer's output [N, C, *spatial] float64."""
        self.count += 1
        factor = 1 / self.count if self.momentum is None else self.momentum
        outputs, means, variances = [], [], []
        for group in x.chunk(self.splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(self.activation(F.batch_norm(group, mean, var, self.weight, self.bias, True, factor, self.eps)))
            means.append(mean)
            variances.append(var)
        self.running_mean, self.running_var = torch.stack(means).mean(0), torch.stack(variances).mean(0)
        return torch.cat(outputs)

    def eval_step(self, x):
        return self.activation(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps))


LAYERS = {
    "BatchNorm2d": (lambda momentum: nn.BatchNorm2d(CHANNELS, momentum=momentum, eps=1e-3), lambda x: x),
    "BatchNormAct2d": (lambda momentum: BatchNormAct2d(CHANNELS, momentum=momentum, act_layer=nn.SiLU), F.silu),
}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", LAYERS)
def test_split_layer_trains_as_each_group_on_its_own_in_float64(kind, momentum, memory_format):
    make, activation = LAYERS[kind]
    layer = with_random_state(make(momentum), seed=1)
    oracle = Float64PerGroup(layer, activation, SPLITS)
    split = convert_split_batchnorm(layer, SPLITS).train()
    for step in range(3):  # the cumulative average divides by the count: several steps
        x = batch(4 * SPLITS, (5, 6), seed=10 + step).contiguous(memory_format=memory_format).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        out, expected = split(x), oracle.train_step(x64)
        assert out.is_contiguous(memory_format=memory_format)  # the next convolution gets the layout it expects
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        (out.double() * probe).sum().backward()
        (expected * probe).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
        for name in ("weight", "bias"):
            got, want = getattr(split, name), getattr(oracle, name)
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
            got.grad, want.grad = None, None
        torch.testing.assert_close(split.running_mean.double(), oracle.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split.running_var.double(), oracle.running_var, rtol=1e-5, atol=1e-6)
        assert split.num_batches_tracked.item() == step + 1


@pytest.mark.parametrize("shape,channels_last", [((), False), ((7,), False), ((7,), True)])
def test_split_batchnorm1d_on_vectors_and_sequences_matches_the_oracle(shape, channels_last):
    layer = with_random_state(nn.BatchNorm1d(CHANNELS), seed=2)
    oracle = Float64PerGroup(layer, lambda x: x, SPLITS)
    split = convert_split_batchnorm(layer, SPLITS)
    x = batch(2 * SPLITS, shape, seed=3)
    if channels_last:  # [N, C, L] stored as [N, L, C]
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    out = split(x)
    torch.testing.assert_close(out.double(), oracle.train_step(x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.running_var.double(), oracle.running_var, rtol=1e-5, atol=1e-6)


def test_split_batchnorm_without_affine_parameters_matches_the_oracle():
    layer = nn.BatchNorm2d(CHANNELS, affine=False)
    oracle = Float64PerGroup(layer, lambda x: x, SPLITS)
    split = convert_split_batchnorm(layer, SPLITS)
    x = batch(2 * SPLITS, (3, 3), seed=8)
    torch.testing.assert_close(split(x).double(), oracle.train_step(x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.running_mean.double(), oracle.running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", LAYERS)
def test_split_layer_in_eval_mode_uses_the_running_statistics_and_leaves_them_alone(kind):
    make, activation = LAYERS[kind]
    layer = with_random_state(make(0.1), seed=4)
    oracle = Float64PerGroup(layer, activation, SPLITS)
    split = convert_split_batchnorm(layer, SPLITS).eval()
    before = [b.clone() for b in split.buffers()]
    x = batch(2 * SPLITS, (4, 4), seed=5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(split(x).double(), oracle.eval_step(x.double()), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(split.buffers(), before))


@pytest.mark.parametrize("kind", LAYERS)
def test_split_layer_refuses_a_batch_its_splits_do_not_divide(kind):
    split = convert_split_batchnorm(LAYERS[kind][0](0.1), SPLITS)
    with pytest.raises(ValueError, match=rf"^bn_splits={SPLITS} must divide the batch size 6$"):
        split(batch(6, (2, 2), seed=6))
    assert split.num_batches_tracked.item() == 0


def test_split_layer_calls_batch_norm_once_whatever_the_number_of_splits(monkeypatch):
    """The groups share one batch-norm kernel (a loop over them would launch S times the kernels)."""
    calls = []
    batch_norm = torch.native_batch_norm
    monkeypatch.setattr(torch, "native_batch_norm",
                        lambda *args, **kwargs: calls.append(args[0].shape) or batch_norm(*args, **kwargs))
    split = convert_split_batchnorm(BatchNormAct2d(CHANNELS), 8)
    split(batch(16, (3, 3), seed=7))
    assert calls == [torch.Size([2, 8 * CHANNELS, 3, 3])]


def test_layers_that_add_to_batchnorm_are_refused_and_plain_subclasses_kept():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Renamed(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match=r"^bn_splits=2 cannot split Scaled layers, only torch's BatchNorm "
                                         r"and timm's BatchNormAct2d; use bn_splits=1 with this model$"):
        convert_split_batchnorm(nn.Sequential(Scaled(CHANNELS)), 2)
    layer = convert_split_batchnorm(Renamed(CHANNELS), 2)
    assert isinstance(layer, Renamed) and layer.num_splits == 2


def test_converting_twice_keeps_one_split_class_and_the_new_number_of_splits():
    layer = convert_split_batchnorm(convert_split_batchnorm(nn.BatchNorm2d(CHANNELS), 2), 4)
    assert type(layer).__mro__[1] is nn.BatchNorm2d and layer.num_splits == 4


@pytest.mark.parametrize("momentum", [0.1, None])
def test_deferred_statistics_wait_for_the_end_of_the_block_and_equal_those_settled_at_once(momentum):
    """Inside `deferred_split_statistics` the groups' mean of the running statistics waits for the
    end of the block, where layers of different splits settle together; a layer that runs again
    settles its first run before the second. The statistics, counts and outputs are those of the
    same forwards outside a block, and `enabled=False` settles at once."""
    layers = [convert_split_batchnorm(with_random_state(nn.BatchNorm2d(CHANNELS, momentum=momentum), seed), splits)
              for seed, splits in ((1, 2), (2, 4))]
    deferred, disabled = copy.deepcopy(layers), copy.deepcopy(layers)
    x = [batch(8, (3, 3), seed) for seed in range(3)]

    def run(pair):
        return [pair[0](x[0]), pair[1](x[1]), pair[0](x[2])]  # the first layer twice

    expected = run(layers)
    initial_mean = deferred[1].running_mean.clone()
    with deferred_split_statistics():
        outputs = run(deferred)
        assert torch.equal(deferred[1].running_mean, initial_mean)  # not settled yet
    with deferred_split_statistics(enabled=False):
        run(disabled)
        assert not torch.equal(disabled[1].running_mean, initial_mean)  # settled at once
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for pair in (deferred, disabled):
        for layer, reference in zip(pair, layers):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(layer, name), getattr(reference, name), rtol=1e-6, atol=0)


def test_the_grouped_copy_keeps_channels_innermost_when_the_input_has_them():
    """The groups-as-channels tensor is laid out as x: channels innermost for channels_last and for
    a 3-D [N, C, L] stored as [N, L, C], else contiguous, so that each copy is one pass in either."""
    x = batch(8, (3, 5), 0)
    sequence_channels_last = batch(8, (5,), 1).transpose(1, 2).contiguous().transpose(1, 2)
    innermost = [x.contiguous(memory_format=torch.channels_last), sequence_channels_last]
    for tensor in innermost:
        grouped = _empty_groups(tensor, 2)
        assert grouped.shape == (4, 2 * tensor.shape[1], *tensor.shape[2:])
        assert grouped.movedim(1, -1).is_contiguous() and not grouped.is_contiguous()
    for tensor in (x, batch(8, (5,), 1), batch(8, (), 2)):
        assert _empty_groups(tensor, 4).is_contiguous()
