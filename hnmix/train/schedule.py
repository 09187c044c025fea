"""The schedules of a run, as functions of the optimizer step: the learning rate (as a multiplier
of `lr_base`, for `LambdaLR`) and the key encoder's momentum."""

from __future__ import annotations

import math
from typing import Callable

from hnmix.train.config import MethodConfig, OptimizationConfig


def lr_schedule(optimization: OptimizationConfig) -> Callable[[int], float]:
    """The seed's schedule (timm CosineLRScheduler): linear warmup from lr_warmup to lr_base over
    the first `warmup_fraction` of the steps (the seed's 10%), cosine from lr_base to lr_min over
    all steps (warmup included, so the cosine has already begun when warmup ends). With
    warmup_fraction 0 and lr_min 0 it is MoCo v2's cosine, per step rather than per epoch.
    Returns step -> multiplier of lr_base."""
    steps, base, low = optimization.steps, optimization.lr_base, optimization.lr_min
    warmup = int(optimization.warmup_fraction * steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            lr = optimization.lr_warmup + step * (base - optimization.lr_warmup) / warmup
        elif step < steps:
            lr = low + 0.5 * (base - low) * (1 + math.cos(math.pi * step / steps))
        else:
            lr = low
        return lr / base

    return lr_at


def momentum_schedule(method: MethodConfig, steps: int) -> Callable[[int], float]:
    """step -> the key encoder's momentum for the update after that step. constant: m_moco;
    cosine (BYOL, MoCo v3): 1 - (1 - m_moco) (cos(pi step / steps) + 1) / 2, from m_moco at
    step 0 to 1 at the last step."""
    if method.momentum_schedule == "constant":
        return lambda step: method.m_moco

    def momentum_at(step: int) -> float:
        progress = min(step, steps) / steps
        return 1 - (1 - method.m_moco) * (math.cos(math.pi * progress) + 1) / 2

    return momentum_at
