"""Split BatchNorm (`--bn_splits`): BatchNorm over S contiguous groups of the batch, as on S GPUs.

One process normalising each group on its own is how MoCo's shuffle BN works without several
GPUs (MoCo's CIFAR-10 demo does the same): `convert_split_batchnorm` turns a model's BatchNorm
layers into split ones in place, and `deferred_split_statistics` settles their running
statistics once per block of forwards.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import ContextManager, Iterator, Optional

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from torch.autograd.function import once_differentiable


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _empty_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """An empty [N / groups, groups * C, *spatial] tensor laid out as x is: channels innermost
    when x has them innermost (channels_last), else contiguous."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    if x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        return x.new_empty(n // groups, *spatial, groups * c).movedim(-1, 1)
    return x.new_empty(n // groups, groups * c, *spatial)


def _copy_to_groups(x: torch.Tensor, out: torch.Tensor, groups: int) -> torch.Tensor:
    """Copy x [N, C, *spatial] into out [N / groups, groups * C, *spatial]: channel g * C + c of
    row i holds channel c of sample g * N / groups + i, so group g is the g-th contiguous block of
    the batch. One copy, between views of both."""
    out.unflatten(1, (groups, x.shape[1])).copy_(x.unflatten(0, (groups, x.shape[0] // groups)).transpose(0, 1))
    return out


def _copy_from_groups(y: torch.Tensor, out: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_copy_to_groups`: y [N / groups, groups * C, *spatial] into out [N, C, *spatial]."""
    out.unflatten(0, (groups, y.shape[0])).transpose(0, 1).copy_(y.unflatten(1, (groups, y.shape[1] // groups)))
    return out


class _SplitBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over `splits` contiguous groups of x [N, C, *spatial], in one kernel
    each way: the groups become channels ([N / S, S * C, *spatial], `_copy_to_groups`), normalised
    by one native_batch_norm, and copied back into a new tensor laid out as x. Backward mirrors
    it, and sums the gradients of the repeated weight and bias over the groups.

    repeated: [rows, S * C], the weight and bias (where the layer has them) and the running mean
    and variance, each repeated S times: the batch norm reads its weight and bias there, and
    updates the last two rows in place, each group its own copy.

    Autograd alone would cost more: its copies back are views, so an in-place activation after
    the layer makes autograd copy the whole tensor again, and each repeat of a parameter costs a
    copy forward and a reduction backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, repeated, splits: int, factor: float, eps: float):
        *affine, mean_repeated, var_repeated = repeated.unbind()
        weight_repeated = affine[0] if weight is not None else None
        bias_repeated = affine[-1] if bias is not None else None
        grouped = _copy_to_groups(x, _empty_groups(x, splits), splits)
        out, save_mean, save_invstd = torch.native_batch_norm(
            grouped, weight_repeated, bias_repeated, mean_repeated, var_repeated, True, factor, eps)
        ctx.save_for_backward(grouped, weight_repeated, save_mean, save_invstd)
        ctx.splits, ctx.eps, ctx.layout = splits, eps, (x.shape, x.stride())
        return _copy_from_groups(out, torch.empty_like(x), splits)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grouped, weight_repeated, save_mean, save_invstd = ctx.saved_tensors
        splits, (needs_x, needs_weight, needs_bias) = ctx.splits, ctx.needs_input_grad[:3]
        grad_grouped = _copy_to_groups(grad_out, torch.empty_like(grouped), splits)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_grouped, grouped, weight_repeated, None, None, save_mean, save_invstd, True, ctx.eps,
            [needs_x, needs_weight, needs_bias])
        if needs_x:
            shape, stride = ctx.layout
            grad_x = _copy_from_groups(grad_x, grad_out.new_empty_strided(shape, stride), splits)
        channels = grouped.shape[1] // splits
        grad_weight = grad_weight.view(splits, channels).sum(0) if needs_weight else None
        grad_bias = grad_bias.view(splits, channels).sum(0) if needs_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


class _DeferredStatistics:
    """Split layers' running statistics whose mean over the groups waits for `flush`: one mean
    over all layers instead of two per layer. A layer that runs again settles its own first."""

    def __init__(self) -> None:
        self.pending: dict[nn.Module, torch.Tensor] = {}  # layer -> its updated statistics [2, S, C]

    def settle(self, layer: nn.Module) -> None:
        """Bring `layer`'s running statistics up to date (before it reads them)."""
        if layer in self.pending:
            _settle(layer, self.pending.pop(layer))

    def flush(self) -> None:
        by_splits: dict[int, list[nn.Module]] = {}
        for layer, statistics in self.pending.items():
            by_splits.setdefault(statistics.shape[1], []).append(layer)
        for layers in by_splits.values():
            pieces = [self.pending[layer] for layer in layers]
            means = torch.cat(pieces, dim=2).mean(dim=1).split([p.shape[2] for p in pieces], dim=1)  # [2, C] each
            torch._foreach_copy_([b for layer in layers for b in (layer.running_mean, layer.running_var)],
                                 [row for mean in means for row in mean.unbind()])
        self.pending.clear()


_DEFERRED: ContextVar[Optional[_DeferredStatistics]] = ContextVar("hnmix_deferred_split_statistics", default=None)


def deferred_split_statistics(enabled: bool = True) -> ContextManager[None]:
    """Inside, split BatchNorm layers leave the mean of their groups' running statistics to the
    end of the block, where one mean settles every layer's (a few kernels per block, not two per
    layer and forward). Read no running statistics inside. Compiled, or not `enabled`, a null
    context: each split layer settles its own statistics (dynamo traces no context variable)."""
    if not enabled or torch.compiler.is_compiling():
        return nullcontext()
    return _deferring()


@contextmanager
def _deferring() -> Iterator[None]:
    deferred = _DeferredStatistics()
    token = _DEFERRED.set(deferred)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
        deferred.flush()


def _settle(layer: nn.Module, statistics: torch.Tensor) -> None:
    """The layer's running mean and variance become the means over the groups of `statistics` [2, S, C]."""
    torch.mean(statistics[0], 0, out=layer.running_mean)
    torch.mean(statistics[1], 0, out=layer.running_var)


def _split_batchnorm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over `num_splits` contiguous groups of the batch, as on that many GPUs.

    Each group is normalised with its own statistics; the running statistics become the mean of
    the groups' updates (at the end of a `deferred_split_statistics` block when inside one), and
    `num_batches_tracked` counts one per call. As the MoCo CIFAR demo's SplitBatchNorm (and
    torch's instance_norm) do, the groups become channels: one batch-norm kernel over x as
    [N / S, S * C, *spatial] with the weight, bias and running statistics repeated S times (one
    cat; `_SplitBatchNorm`), where a loop over the groups would cost S times the kernel launches.
    The demo's `x.view(-1, C * S, H, W)` groups samples S apart and is free only in the
    contiguous layout; contiguous groups cost one copy in and one out, in either layout.
    timm's BatchNormAct2d then applies its drop and activation. Eval mode, one split, and layers
    that track no running statistics run the layer's own forward.
    """
    if not self.training or self.num_splits == 1 or not self.track_running_stats:
        return super(type(self), self).forward(x)
    self._check_input_dim(x)
    splits = self.num_splits
    if x.shape[0] % splits:
        raise ValueError(f"bn_splits={splits} must divide the batch size {x.shape[0]}")
    self.num_batches_tracked.add_(1)
    # momentum=None is BatchNorm's cumulative average; like torch's BatchNorm, it reads the count on the host.
    factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    deferred = None if torch.compiler.is_compiling() else _DEFERRED.get()
    if deferred is not None:
        deferred.settle(self)
    rows = [t for t in (self.weight, self.bias) if t is not None] + [self.running_mean, self.running_var]
    with torch.no_grad():
        repeated = torch.cat([t for t in rows for _ in range(splits)]).view(len(rows), -1)
    out = _SplitBatchNorm.apply(x, self.weight, self.bias, repeated, splits, factor, self.eps)
    statistics = repeated[-2:].view(2, splits, -1)
    if deferred is None:
        _settle(self, statistics)
    else:
        deferred.pending[self] = statistics
    if isinstance(self, BatchNormAct2d):
        out = self.act(self.drop(out))
    return out


_SPLIT_CLASSES: dict[type, type] = {}
# The forwards a split layer replaces: torch's BatchNorm1d/2d/3d and timm's BatchNormAct2d (BatchNorm, drop, act).
_SPLITTABLE_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, BatchNormAct2d.forward)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Turn every BatchNorm of `module` into a split BatchNorm with `num_splits` groups, in place.

    The class of each layer is swapped for a subclass, so parameters, buffers and state-dict keys
    stay as they are and checkpoints load either way. Layers whose forward does more than
    torch's BatchNorm or timm's BatchNormAct2d are refused (ValueError): their extras would be lost.
    """
    if num_splits < 1:
        raise ValueError(f"bn_splits must be >= 1, got {num_splits}")
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            base = next(c for c in type(layer).__mro__ if c not in _SPLIT_CLASSES.values())
            if base.forward not in _SPLITTABLE_FORWARDS:
                raise ValueError(f"bn_splits={num_splits} cannot split {base.__name__} layers, only torch's "
                                 "BatchNorm and timm's BatchNormAct2d; use bn_splits=1 with this model")
            if base not in _SPLIT_CLASSES:
                _SPLIT_CLASSES[base] = type(f"Split{base.__name__}", (base,), {"forward": _split_batchnorm_forward})
            layer.__class__ = _SPLIT_CLASSES[base]
            layer.num_splits = num_splits
    return module

