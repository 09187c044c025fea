"""The learning-rate schedule, as a multiplier of `lr_base` per optimizer step (for `LambdaLR`).
"""

from __future__ import annotations

import math

from hnmix.train.config import (
    TrainConfig,
)


def seed_lr_schedule(config: TrainConfig):
    """The seed's schedule (timm CosineLRScheduler): linear warmup from lr_warmup to lr_base over
    the first 10% of steps, cosine from lr_base to lr_min over all steps (warmup included, so the
    cosine has already begun when warmup ends). Returns step -> multiplier of lr_base."""
    warmup = int(0.1 * config.steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            lr = config.lr_warmup + step * (config.lr_base - config.lr_warmup) / warmup
        elif step < config.steps:
            lr = config.lr_min + 0.5 * (config.lr_base - config.lr_min) * (1 + math.cos(math.pi * step / config.steps))
        else:
            lr = config.lr_min
        return lr / config.lr_base

    return lr_at
