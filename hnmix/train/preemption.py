"""SIGTERM / SIGINT / SIGUSR1 become a request to stop cleanly after the current step, on every rank.

A signal may reach the ranks at different steps, so the decision is an all-reduce (MAX) of
each rank's flag after every step. It runs over a gloo group on the CPU: no GPU synchronisation
in the step. A second SIGINT (Ctrl-C twice) interrupts at once. Launchers deliver the signal to
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

    def warn_if_too_short(self, step_s: float, save_s: float) -> bool:
        """Warn when a step plus a save would not fit before the SIGKILL; returns whether it warned."""
        if step_s + save_s <= self.seconds:
            return False
        logger.warning(f"A step ({step_s:.1f} s) plus a save ({save_s:.1f} s) take longer than the {self.seconds:.0f} s "
                       f"that {self.imposed_by} leaves after a stop signal: a preempted run would lose the steps since "
                       f"its last checkpoint. {self.way_out}")
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


class StopSignal:
    """Installs the handlers (until `restore`, or the end of a `with` block); `requested()` says,
    identically on every rank, whether to stop."""

    def __init__(self) -> None:
        self.received: Optional[signal.Signals] = None
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if distributed else None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
        self.received_at = self.received_at or time.monotonic()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    def requested(self) -> bool:
        flag = torch.tensor([int(self.received is not None)])
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
