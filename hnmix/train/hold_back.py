"""The hold-back of a training step's BatchNorm statistics: saved before the forward, restored
after the guard where the step was skipped, on the device (`hnmix.train.step`).

The queue's share of the hold-back is `MoCo.forward(..., enqueue=False)` and
`KeyQueue.enqueue(..., apply=applied)`; the BatchNorm running statistics are the other effect of a
forward outside the optimizer, and a skipped step's may be non-finite.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def batchnorm_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics buffers of `module`'s BatchNorm layers (a forward in training mode
    updates them)."""
    return [buffer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
            if buffer is not None]


def save_batchnorm_statistics(buffers: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The contents of `buffers` (`batchnorm_statistics(module)`, listed once: the list stays
    valid while the module stays on its device), for `restore_batchnorm_statistics`."""
    return _as_bytes(buffers)


@torch.no_grad()
def restore_batchnorm_statistics(buffers: list[torch.Tensor], saved: Optional[torch.Tensor], *,
                                 unless: torch.Tensor) -> None:
    """Put back the statistics `save_batchnorm_statistics(buffers)` returned as `saved`, except
    where `unless` ([] bool on their device) is True, where the current ones stay. Decided on
    the device, with no host synchronisation. A ResNet-50 has 318 statistics buffers in MoCo's
    two encoders: as one tensor of their bytes, they are saved and restored in a few kernels, not
    a few per buffer, and a byte-wise select restores every dtype (float statistics, int64
    counts) exactly."""
    if buffers:
        sizes = [b.numel() * b.element_size() for b in buffers]
        kept = torch.where(unless, _as_bytes(buffers), saved).split(sizes)
        torch._foreach_copy_([b.view(-1).view(torch.uint8) for b in buffers], list(kept))


def _as_bytes(buffers: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The contents of `buffers` (contiguous, one device, any dtypes) as one new uint8 tensor
    [sum of their sizes in bytes], in order; None for no buffers."""
    if not buffers:
        return None
    return torch.cat([b.reshape(-1).view(torch.uint8) for b in buffers])
