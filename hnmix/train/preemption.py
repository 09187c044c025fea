"""SIGTERM / SIGINT / SIGUSR1 become a request to stop cleanly after the current step, on every rank.

A signal may reach the ranks at different steps, so with several processes the decision is an
all-reduce (MAX) of each rank's flag over a gloo group on the CPU: no GPU synchronisation. It is
not taken after every step, where it would be a host barrier per step, but at the steps the
ranks agreed on at the previous agreement: about every AGREE_EVERY_S seconds, judged from the
slowest rank's step time (`steps_between_agreements`), so every rank stops at the same step, at
most about AGREE_EVERY_S (or one step, if longer) after the signal. One process stops after the
step in which the signal came. A second SIGINT (Ctrl-C twice) interrupts at once. Launchers deliver the signal to
whole process trees or groups; the DataLoader workers ignore it (`hnmix.data.workers`), so that the
step in flight finishes.

Launchers and their deadlines (`stop_deadline`): after the signal, accelerate >= 1.16's
single-process launcher SIGKILLs the trainer's tree 5 s later, torch's elastic agent (several
processes) `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` s later; the trainer warns once when a step plus a save
takes longer. Accelerate <= 1.15's single-process launcher did not forward signals, and a launcher
killed outright forwards nothing, so `follow_the_launcher` asks the kernel to send this process
SIGTERM when its launcher dies (PR_SET_PDEATHSIG). Launchers do not pass exit code 75 on (the
single-process one exits 128 + the signal, torch's agent 1 or 128 + the signal), so a stop also
leaves `dir_out/STOPPED` naming the checkpoint: the signal a requeue script can rely on.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from accelerate.logging import get_logger

from hnmix.data.workers import STOP_SIGNALS

# Exit code of a run that stopped on SIGTERM/SIGINT after saving (EX_TEMPFAIL: try again later,
# e.g. with --resume latest). Documented in the README.
EXIT_STOPPED = 75
logger = get_logger("hnmix")

STOPPED_MARKER = "STOPPED"
_PR_SET_PDEATHSIG = 1
_LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run")


def launched_by_a_launcher(pid: int) -> bool:
    """Whether process `pid` is `accelerate launch` or torchrun (read from /proc)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(name.encode() in argument for argument in arguments[:3] for name in _LAUNCHERS)


def follow_the_launcher() -> bool:
    """When this process was started by `accelerate launch` or torchrun (Linux), have the kernel
    send it SIGTERM if that launcher dies, so that it saves and stops instead of training on as an
    orphan. Not for other parents: a shell that exits must not stop a `nohup` run. Returns whether
    it was set."""
    parent = os.getppid()
    if not launched_by_a_launcher(parent):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the launcher died before the request: act on it now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def write_stopped_marker(dir_out: Path, *, cause: str, step: int, checkpoint: Optional[Path]) -> Path:
    """dir_out/STOPPED: why and where the run stopped, and how to go on (removed when a run starts)."""
    marker = Path(dir_out) / STOPPED_MARKER
    marker.write_text(f"stopped by {cause} after step {step}\ncheckpoint {checkpoint}\n"
                      "continue with --resume latest (exit code 75)\n")
    return marker


# accelerate >= 1.16's single-process launcher: SIGTERM to the tree, SIGKILL 5 s later
# (`_terminate_process_tree` in accelerate/commands/launch.py).
SIMPLE_LAUNCHER_GRACE_S = 5.0


@dataclass(frozen=True)
class StopDeadline:
    """How long a trainer lives after a stop signal before its launcher SIGKILLs it."""

    seconds: float  # math.inf when nothing kills it
    imposed_by: str = ""
    way_out: str = ""

    def warn_if_too_short(self, step_s: float, save_s: float, agree_s: float = 0.0) -> bool:
        """Warn when a step (or the `agree_s` seconds the ranks may train on before they agree
        on the stop, if longer) plus a save would not fit before the SIGKILL; returns whether it
        warned."""
        if max(step_s, agree_s) + save_s <= self.seconds:
            return False
        agreement = f" (with up to {agree_s:.1f} s until the ranks agree on the stop)" if agree_s > step_s else ""
        logger.warning(f"A step ({step_s:.1f} s){agreement} plus a save ({save_s:.1f} s) take longer than the "
                       f"{self.seconds:.0f} s that {self.imposed_by} leaves after a stop signal: a preempted run would "
                       f"lose the steps since its last checkpoint. {self.way_out}")
        return True


def accelerate_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version("accelerate").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0,)


def stop_deadline() -> StopDeadline:
    """The deadline of the launcher that started this process (read from the environment and /proc)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return StopDeadline(float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")),
                            "torch's elastic agent (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)",
                            "Raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT (the launch/ scripts set 150).")
    if launched_by_a_launcher(os.getppid()) and accelerate_version() >= (1, 16):
        return StopDeadline(SIMPLE_LAUNCHER_GRACE_S, "accelerate launch with one process",
                            "Start one process without the launcher instead: launch/one_gpu.sh or "
                            "python -m hnmix.train (the same run; the trainer gets the signal itself).")
    return StopDeadline(math.inf)


# Several processes agree on a stop about this often: a barrier a second costs nothing, and a
# stop then comes within about a second (or one step, if longer) of the signal.
AGREE_EVERY_S = 1.0
MAX_STEPS_BETWEEN_AGREEMENTS = 1000


def steps_between_agreements(slowest_step_s: float, agree_every_s: float = AGREE_EVERY_S) -> int:
    """The steps until the next agreement: those that take `agree_every_s` at the slowest rank's
    seconds per step, at least 1, at most MAX_STEPS_BETWEEN_AGREEMENTS."""
    if slowest_step_s <= 0:
        return MAX_STEPS_BETWEEN_AGREEMENTS
    return max(1, min(MAX_STEPS_BETWEEN_AGREEMENTS, int(agree_every_s / slowest_step_s)))


class StopSignal:
    """Installs the handlers (until `restore`, or the end of a `with` block); `requested()`,
    called once per step on every rank, says whether to stop, and says it at the same step on
    every rank.

    Several processes agree at the first call, then every `steps_between_agreements` calls: each
    agreement all-reduces (MAX) the flag with the seconds per step since the last one, so every
    rank derives the same next agreement from the slowest rank's pace. Between agreements a call
    reads nothing from the other ranks and waits for none of them. `agreements` counts them."""

    def __init__(self, agree_every_s: float = AGREE_EVERY_S) -> None:
        self.received: Optional[signal.Signals] = None
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self.agree_every_s = agree_every_s
        self.agreements = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if distributed else None
        self._calls_to_agreement, self._calls_since, self._since = 1, 0, time.monotonic()

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
        self.received_at = self.received_at or time.monotonic()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    @property
    def agree_s(self) -> float:
        """How long the ranks may train on after a signal before they agree on it: 0 for one process."""
        return 0.0 if self._group is None else self.agree_every_s

    def requested(self) -> bool:
        if self._group is None:
            return self.received is not None
        self._calls_since += 1
        if self._calls_since < self._calls_to_agreement:
            return False
        return self._agree()

    def _agree(self) -> bool:
        seconds_per_step = (time.monotonic() - self._since) / self._calls_since
        agreed = torch.tensor([float(self.received is not None), seconds_per_step], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._group)
        self.agreements += 1
        stop, slowest_step_s = bool(agreed[0]), float(agreed[1])
        self._calls_to_agreement = steps_between_agreements(slowest_step_s, self.agree_every_s)
        self._calls_since, self._since = 0, time.monotonic()
        return stop

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
