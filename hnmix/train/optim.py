"""The optimizer and the non-finite step guard, both free of host synchronisation per step.

`make_optimizer` builds the optimizer through timm's `create_optimizer_v2` (no weight decay on
biases and norm layers, or with `decay_all_params` on every parameter as in MoCo's own code):
AdamW (the seed's), SGD with momentum (MoCo's; timm's "momentum", since timm's "sgd" is Nesterov)
or LARS (timm's; it adapts exactly the groups with weight decay, so the groups without skip its
trust-ratio adaptation, as in SimCLR and BYOL, and with `decay_all_params` every parameter is
adapted: timm's LARS cannot decay a parameter without adapting it). AdamW and SGD use torch's fused kernels where the device has
them (CUDA, and the CPU too in recent torch), else the foreach ones; timm's LARS picks its own
(foreach where its timm has them).

`NonFiniteGuard` skips the optimizer step (and, through `MoCo.momentum_update(apply)`, the key
encoder's update) on a step whose gradient norm is inf or NaN, and stops a run once
`max_nonfinite_steps` steps in a row were skipped. With a fused optimizer the decision stays on
the device: the guard hands the optimizer a `found_inf` tensor, the contract torch's GradScaler
uses for fused optimizers, and the kernel leaves parameters, moments and step counters as they
were. The counts stay on the device too, and are read only by `check`, which the trainer calls
where it reads the device anyway (log lines, checkpoints). LARS has no fused kernel, so under
LARS the guard reads the norm's finiteness on the host: one synchronisation per step, which
stalls the host until the step's backward is done (on a GPU, the data pipeline and kernel
launches of the next step can no longer overlap it). Under fp16 Accelerate's GradScaler skips
those steps itself (its own found_inf, from the same unscaled gradients); the guard then only
counts them, so `skipped_steps` and `max_nonfinite_steps` mean the same in every precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

from hnmix.errors import TrainingDivergedError

try:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # a torch without the helper: fused AdamW was CUDA-only then

    def _get_fused_kernels_supported_devices() -> list[str]:
        return ["cuda"]


def fused_available(device: Union[torch.device, str]) -> bool:
    """Whether torch has fused AdamW and SGD kernels for parameters on `device`'s type."""
    return torch.device(device).type in _get_fused_kernels_supported_devices()


# hnmix's names -> timm's: timm's "sgd" is Nesterov SGD, its "momentum" the plain SGD with momentum MoCo uses.
TIMM_OPTIMIZERS = {"adamw": "adamw", "sgd": "momentum", "lars": "lars"}
FUSED_OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(module: nn.Module, *, lr: float, weight_decay: float, device: Union[torch.device, str],
                   name: str = "adamw", momentum: float = 0.9, decay_all_params: bool = False) -> torch.optim.Optimizer:
    """`name` (adamw, sgd or lars) over `module`'s trainable parameters, grouped by timm (biases
    and 1-D parameters without weight decay; with `decay_all_params` one group, all with it),
    fused where `device` (where the parameters will train) supports it and the optimizer has a
    fused kernel, else foreach. The parameters may still be elsewhere: a fused optimizer checks
    their device at its first step."""
    if name not in TIMM_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(TIMM_OPTIMIZERS)}, got {name!r}")
    options = {} if name == "adamw" else {"momentum": momentum}
    if name in FUSED_OPTIMIZERS:  # torch's; timm's LARS takes no kernel choice before timm 1.0.31
        options["fused" if fused_available(device) else "foreach"] = True
    return create_optimizer_v2(module, opt=TIMM_OPTIMIZERS[name], lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=not decay_all_params, **options)


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's `AcceleratedOptimizer`."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class NonFiniteGuard:
    """Steps `optimizer` only when the gradient norm is finite; counts the skipped steps.

    step(grad_norm) each training step, in place of `optimizer.step()`. Device-side counters,
    int64 [3]: skipped steps in all, the current run of consecutive skipped steps, and the number
    of steps after the one where a run first reached `max_nonfinite_steps` (-1 while none has),
    from which `check` names that step.

    With a fused optimizer (`fused` is True) a step has no host synchronisation. Other optimizers
    cannot skip on the device, so the guard reads the norm's finiteness on the host (`.item()`),
    one synchronisation per step. An optimizer with a GradScaler (Accelerate's under fp16:
    `scaler_skips`) skips the step itself; the guard steps it and counts.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_nonfinite_steps: int, *,
                 device: Union[torch.device, str]) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.optimizer, self.max_nonfinite_steps = optimizer, max_nonfinite_steps
        self.scaler_skips = getattr(optimizer, "scaler", None) is not None
        self.inner = innermost_optimizer(optimizer)
        self.fused = bool(getattr(self.inner, "_step_supports_amp_scaling", False))
        self.counters = torch.tensor([0, 0, -1], dtype=torch.long, device=device)

    def step(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Step the optimizer unless `grad_norm` ([] float, the norm after clipping (and, under
        fp16, after unscaling), equal on every rank) is inf or NaN. Returns `applied`, [] bool on
        the norm's device, for `MoCo.momentum_update(applied)` and the enqueue (`hnmix.train.step`)."""
        applied = torch.isfinite(grad_norm)
        nonfinite = applied.logical_not().to(self.counters.device)  # [] bool
        total, run, since_limit = self.counters.unbind()
        run = run.add(1).mul_(nonfinite)
        # -1 until a run reaches the limit; from the step it does (-1 + 1 = 0), one more every step.
        since_limit = since_limit + ((since_limit >= 0) | (run >= self.max_nonfinite_steps))
        self.counters = torch.stack([total + nonfinite, run, since_limit])
        if self.scaler_skips:
            self.optimizer.step()  # the GradScaler skips a step with inf/NaN gradients
        elif self.fused:
            # A float32 1.0 makes the fused kernel leave everything, step counters included, as it was.
            self.inner.found_inf = nonfinite.float()
            try:
                self.optimizer.step()
            finally:
                self.inner.__dict__.pop("found_inf", None)
        elif applied.item():
            self.optimizer.step()
        return applied

    def read(self) -> tuple[int, int, int]:
        """(skipped steps, current run, steps since the run reached the limit or -1): one host read."""
        total, run, since_limit = self.counters.tolist()
        return total, run, since_limit

    def check(self, steps_done: int, last_checkpoint: Optional[Union[str, Path]] = None) -> int:
        """The number of skipped steps, one host read; raises TrainingDivergedError if a run of
        `max_nonfinite_steps` skipped steps in a row happened at any step so far, even one that
        later steps ended. `steps_done` counts the steps so far (one per `step` call), to name the
        step the run reached the limit; `last_checkpoint` is the one to resume from."""
        total, _, since_limit = self.read()
        if since_limit >= 0:
            raise TrainingDivergedError(
                f"{self.max_nonfinite_steps} steps in a row up to step {steps_done - since_limit} had a non-finite "
                f"loss or gradient; the last good checkpoint is {last_checkpoint or 'none (no checkpoint yet)'}: "
                "resume from it with a lower --lr_base or --clip_grad, or bf16/fp32 instead of fp16")
        return total

    def state(self) -> dict[str, int]:
        """Plain ints for the trainer state (JSON); call `check` first so that no diverged run is saved."""
        total, run, _ = self.read()
        return {"skipped_steps": total, "nonfinite_in_a_row": run}

    def load_state(self, state: dict) -> None:
        """Restore `state()`'s counts; missing keys (older checkpoints) count as 0."""
        values = [int(state.get("skipped_steps", 0)), int(state.get("nonfinite_in_a_row", 0)), -1]
        self.counters = torch.tensor(values, dtype=torch.long, device=self.counters.device)
