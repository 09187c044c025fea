"""SIGTERM / SIGINT become a request to stop cleanly after the current step, on every rank.

A signal may reach the ranks at different steps, so the decision is an all-reduce (MAX) of
each rank's flag after every step. It runs over a gloo group on the CPU: no GPU synchronisation
in the step. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

# Exit code of a run that stopped on SIGTERM/SIGINT after saving (EX_TEMPFAIL: try again later,
# e.g. with --resume latest). Documented in the README.
EXIT_STOPPED = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Installs the handlers (until `restore`, or the end of a `with` block); `requested()` says,
    identically on every rank, whether to stop."""

    def __init__(self) -> None:
        self.received: Optional[signal.Signals] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if distributed else None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
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
