"""Step statistics between log lines, and the metrics.jsonl file.

`StatsWindow` keeps running sums on the device (no host synchronisation per step) and reads them
once per log line. Its sums travel in checkpoints, so a resumed run logs the same averages as an
uninterrupted one even when it resumed in the middle of a window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator


class StatsWindow:
    """Sums of 0-dim statistic tensors since the last log line, with their counts."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach()
            self.counts[name] = self.counts.get(name, 0) + 1

    def _sums_over_processes(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        sums = accelerator.reduce(torch.stack([self.sums[n] for n in names]), reduction="mean")
        return dict(zip(names, sums.tolist()))

    def mean_over_processes(self, accelerator: Accelerator) -> dict[str, float]:
        """The window's averages over steps and processes (one all-reduce); empties the window.
        Every rank calls it."""
        sums = self._sums_over_processes(accelerator)
        means = {name: total / self.counts[name] for name, total in sums.items()}
        self.sums, self.counts = {}, {}
        return means

    def state(self, accelerator: Accelerator) -> dict[str, list]:
        """{name: [sum averaged over processes, count]} for a checkpoint. Every rank calls it."""
        return {name: [total, self.counts[name]] for name, total in self._sums_over_processes(accelerator).items()}

    def load_state(self, state: dict[str, list], device: torch.device) -> None:
        self.sums = {name: torch.tensor(total, dtype=torch.float32, device=device) for name, (total, _) in state.items()}
        self.counts = {name: count for name, (_, count) in state.items()}


class RunningCount:
    """A count summed over steps and processes (e.g. replaced unreadable images), kept on the
    device between reads. `total` is a collective: every rank calls it at the same step."""

    def __init__(self, start: int = 0) -> None:
        self.counted = start  # over all processes, up to the last `total`
        self.pending: torch.Tensor | int = 0  # this rank's, since then

    def add(self, counts: torch.Tensor) -> None:
        self.pending = self.pending + counts.sum()

    def total(self, accelerator: Accelerator) -> int:
        pending = torch.as_tensor(self.pending, device=accelerator.device).reshape(1)
        self.counted += int(accelerator.reduce(pending, reduction="sum").item())
        self.pending = 0
        return self.counted


def append_record(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def drop_records_after(path: Path, step: int) -> None:
    """Remove records of steps after `step` (logged after the checkpoint a run resumes from)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
