"""One training step: the forward, backward, clipping, the guarded optimizer step, the key
encoder's momentum update, the enqueue, the schedule and the step's statistics, all without a
host synchronisation. The step's effects on the model outside the optimizer wait for the guard:
the keys are enqueued, and the BatchNorm running statistics the forward updated kept, only where
the step was not skipped, so that a skipped step's possibly non-finite keys and statistics never
stay.

`TrainStep` holds the parts a step needs; `hnmix.train.loop` runs one per batch, and
`python -m hnmix.bench overhead` counts the kernel launches of the same call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from accelerate import Accelerator

from hnmix.data.photometric import StepPhotometric
from hnmix.moco import MoCo
from hnmix.train.hold_back import batchnorm_statistics, restore_batchnorm_statistics, save_batchnorm_statistics
from hnmix.train.metrics import RunningCount, StatsWindow
from hnmix.train.optim import NonFiniteGuard


@dataclass
class TrainStep:
    """The parts of a training step.

    model: the prepared MoCo (DDP-wrapped under several processes); moco: the same, unwrapped.
    momentum_at: step -> the key encoder's momentum; clip_grad: the gradient-norm limit (0: none).
    photometric: the batched photometric half when it runs on the accelerator, else None.
    has_labels: whether the labels of a batch mean anything (the false-negative statistic).
    """

    model: nn.Module
    moco: MoCo
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: NonFiniteGuard
    window: StatsWindow
    bad_images: RunningCount
    momentum_at: Callable[[int], float]
    clip_grad: float
    photometric: Optional[StepPhotometric] = None
    has_labels: bool = True
    statistics: list[torch.Tensor] = field(init=False)  # the BatchNorm buffers, listed once

    def __post_init__(self) -> None:
        self.statistics = batchnorm_statistics(self.moco)

    def __call__(self, view_q: torch.Tensor, view_k: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                 unreadable: torch.Tensor, step: int) -> torch.Tensor:
        """Train on one batch (views [B, 3, H, W], ids, labels and unreadable counts [B]) as
        optimizer step `step`; returns `applied`, [] bool on the device: False where the guard
        skipped the step (a non-finite gradient norm)."""
        if self.photometric:
            view_q, view_k = self.photometric(view_q, view_k, step)
        saved = save_batchnorm_statistics(self.statistics)
        loss, stats, keys = self.model(view_q, view_k, ids, labels if self.has_labels else None, step=step,
                                       enqueue=False)
        self.accelerator.backward(loss)
        # The norm is equal on every rank (DDP averaged the gradients, NaN/inf included): a
        # non-finite one skips both updates everywhere, decided on the device.
        grad_norm = self.clip_gradients()
        applied = self.guard.step(grad_norm)
        self.moco.momentum_update(applied, self.momentum_at(step))
        self.moco.queue.enqueue(*keys, apply=applied)  # after the backward, which read the queue
        restore_batchnorm_statistics(self.statistics, saved, unless=applied)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window.add(stats, applied)  # a skipped step's statistics stay out of the means
        self.bad_images.add(unreadable)
        return applied

    def clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm [] (after unscaling under fp16), clipped to `clip_grad` unless
        it is 0. As `Accelerator.clip_grad_norm_` does for DDP, without its grouping of the
        gradients by DTensor mesh (two more ops per step, and hnmix has no DTensors)."""
        self.accelerator.unscale_gradients()
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
        if self.clip_grad:
            torch.nn.utils.clip_grads_with_norm_(parameters, self.clip_grad, norm, foreach=True)
        return norm
