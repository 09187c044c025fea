"""hnmix.train with CUDA's sync debug mode at "error" over the steps, outside the log lines.

From the second step on, the mode is "error" from the batched photometric half (the first thing a
step does with its batch) until a log line reads the step statistics (`StatsWindow.
mean_over_processes`), and from there "default" until the next step's photometric half: every
operation of a step that waits for the GPU (`.item()`, a device-to-host copy, a stream
synchronisation), the loading of the next batch included, raises there. The first step is left
out: it initialises lazily (optimizer moments, cuDNN handles, the loss scaler). The hooks change
no computation. The last line on stdout is JSON: {"guarded_steps": [...], "exit": code}.

Usage: python tests/cuda/sync_free_train.py HNMIX_TRAIN_OPTIONS... (needs --augment_device accelerator,
the default on a GPU).
"""

import json
import sys

import torch

from hnmix.train import loop
from hnmix.train.metrics import StatsWindow

guarded_steps: list[int] = []
read_statistics = StatsWindow.mean_over_processes


class GuardedPhotometric(loop.StepPhotometric):
    """The trainer's batched photometric half, turning the sync debug mode to "error" first."""

    def __call__(self, view_q: torch.Tensor, view_k: torch.Tensor, step: int):
        if step >= 1:
            torch.cuda.set_sync_debug_mode("error")
            guarded_steps.append(step)
        return super().__call__(view_q, view_k, step)


def read_statistics_allowed_to_sync(self: StatsWindow, accelerator):
    """A log line: the one place of a step that may wait for the GPU."""
    torch.cuda.set_sync_debug_mode("default")
    return read_statistics(self, accelerator)


if __name__ == "__main__":
    loop.StepPhotometric = GuardedPhotometric
    StatsWindow.mean_over_processes = read_statistics_allowed_to_sync
    try:
        code = loop.main(sys.argv[1:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(json.dumps({"guarded_steps": guarded_steps, "exit": code}))
    sys.exit(code)
