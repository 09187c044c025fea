"""SIGTERM / SIGINT become a request to stop cleanly after the current step, on every rank.

A signal may reach the ranks at different steps, so the decision is an all-reduce (MAX) of
each rank's flag after every step. It runs over a gloo group on the CPU: no GPU synchronisation
in the step. A second SIGINT (Ctrl-C twice) interrupts at once.

Launchers: Accelerate's single-process launcher does not forward signals, and a launcher killed
outright forwards nothing, so `follow_the_launcher` asks the kernel to send this process SIGTERM
when its launcher dies (PR_SET_PDEATHSIG). Launchers do not all pass exit code 75 on (the
single-process one dies with 143, torch's elastic agent exits 1 after a signal), so a stop also
leaves `dir_out/STOPPED` naming the checkpoint: the signal a requeue script can rely on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# Exit code of a run that stopped on SIGTERM/SIGINT after saving (EX_TEMPFAIL: try again later,
# e.g. with --resume latest). Documented in the README.
EXIT_STOPPED = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
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


def shutdown_budget_s() -> float:
    """Seconds a worker of torch's elastic agent has after a signal before the agent SIGKILLs it
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30); unbounded outside the agent."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return float("inf")
    return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


class StopSignal:
    """Installs the handlers (until `restore`, or the end of a `with` block); `requested()` says,
    identically on every rank, whether to stop."""

    def __init__(self) -> None:
        self.received: Optional[signal.Signals] = None
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
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
