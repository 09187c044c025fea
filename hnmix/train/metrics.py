"""Step statistics between log lines, and the metrics.jsonl file.

`StatsWindow` keeps running sums on the device (no host synchronisation per step) and reads them
once per log line; a step the non-finite guard skipped does not enter them. Its sums travel in checkpoints, so a resumed run logs the same averages as an
uninterrupted one even when it resumed in the middle of a window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator


class StatsWindow:
    """Sums of 0-dim statistic tensors over the applied steps since the last log line, with the
    number of those steps, per statistic. Both stay on the device: a step's `applied` (the
    non-finite guard's decision, a [] bool tensor) weights its statistics without a host read,
    so a skipped step (NaN loss) leaves the means to the applied ones.

    A step's statistics are summed as one stacked tensor (a few kernels per step however many
    statistics there are, where a sum per statistic would launch several each), continuing the
    per-statistic sums exactly as adding them one by one would; `sums` and `counts` hold them by
    name again whenever they are read, or when the set of statistics changes."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # [] float32, applied steps that had the statistic
        self._names: tuple[str, ...] = ()  # the statistics summed in _sums and _counts, in their order
        self._sums: Optional[torch.Tensor] = None  # [len(_names)]
        self._counts: Optional[torch.Tensor] = None  # [len(_names)] float32

    def add(self, stats: dict[str, torch.Tensor], applied: Optional[torch.Tensor] = None) -> None:
        """Add one step's `stats` (name -> [] tensor) unless `applied` ([] bool on their device)
        is False; None counts the step."""
        names = tuple(stats)
        values = torch.stack([value.detach() for value in stats.values()])
        if applied is None:
            weight = torch.ones((), device=values.device)
        else:
            weight = applied.to(values.device)  # bool: added to the float counts as 0 or 1
            values = torch.where(weight, values, 0.0)  # not values * keep: NaN x 0 is NaN
        if names != self._names:
            self._unstack()
            self._names = names
            if any(name in self.sums for name in names):  # go on from their sums so far
                zero = values.new_zeros(())
                self._sums = torch.stack([self.sums.get(name, zero) for name in names])
                self._counts = torch.stack([self.counts.get(name, zero).float() for name in names])
        self._sums = values if self._sums is None else self._sums + values
        self._counts = weight.float().expand(len(names)) if self._counts is None else self._counts + weight

    def _unstack(self) -> None:
        """Move the stacked sums into `sums` and `counts`, by name."""
        for index, name in enumerate(self._names):
            self.sums[name], self.counts[name] = self._sums[index], self._counts[index]
        self._names, self._sums, self._counts = (), None, None

    def _totals_over_processes(self, accelerator: Accelerator) -> tuple[list[str], list[float], list[float]]:
        """(names, sums, counts), the sums averaged over processes, the counts as every rank has
        them (the guard decides alike on every rank): one all-reduce."""
        self._unstack()
        names = sorted(self.sums)
        if not names:
            return [], [], []
        totals = torch.stack([self.sums[n].float() for n in names] + [self.counts[n].float() for n in names])
        totals = accelerator.reduce(totals, reduction="mean").tolist()
        return names, totals[: len(names)], totals[len(names):]

    def mean_over_processes(self, accelerator: Accelerator) -> dict[str, float]:
        """The window's averages over its applied steps and over processes (one all-reduce); a
        statistic without an applied step has none. Empties the window. Every rank calls it."""
        names, sums, counts = self._totals_over_processes(accelerator)
        means = {name: total / count for name, total, count in zip(names, sums, counts) if count > 0}
        self.sums, self.counts = {}, {}
        return means

    def state(self, accelerator: Accelerator) -> dict[str, Any]:
        """For a checkpoint: every rank's own sums (so that a resume on as many processes adds to
        exactly the same float32 values as the uninterrupted run) and the counts of applied steps
        (ints). Every rank calls it."""
        self._unstack()
        names = sorted(self.sums)
        if not names:
            return {"names": [], "per_rank": [], "counts": {}}
        per_rank = accelerator.gather(torch.stack([self.sums[n] for n in names]).float().unsqueeze(0))
        counts = torch.stack([self.counts[n].float() for n in names]).tolist()
        return {"names": names, "per_rank": per_rank.tolist(), "counts": {n: round(c) for n, c in zip(names, counts)}}

    def load_state(self, state: dict[str, Any], device: torch.device, *, rank: int, world: int) -> None:
        """Restore `state()`. On the same number of processes each rank gets its own sums back; on
        another, every rank gets their mean, which keeps the window's mean over processes."""
        self._names, self._sums, self._counts = (), None, None
        if "per_rank" not in state:  # a checkpoint of hnmix 0.1: {name: [mean over ranks, count]}
            state = {"names": sorted(state), "per_rank": [[state[n][0] for n in sorted(state)]],
                     "counts": {n: count for n, (_, count) in state.items()}}
        if not state["names"]:
            self.sums, self.counts = {}, {}
            return
        rows = torch.tensor(state["per_rank"], dtype=torch.float32).reshape(-1, len(state["names"]))
        mine = rows[rank] if rows.shape[0] == world else rows.mean(dim=0)
        self.sums = {name: value.to(device) for name, value in zip(state["names"], mine)}
        self.counts = {name: torch.tensor(float(state["counts"][name]), device=device) for name in state["names"]}


class RunningCount:
    """A count summed over steps and processes (e.g. replaced unreadable images), kept on the
    device between reads. `total` is a collective: every rank calls it at the same step."""

    def __init__(self, start: int = 0) -> None:
        self.counted = start  # over all processes, up to the last `total`
        self.pending: torch.Tensor | int = 0  # this rank's, since then

    def add(self, counts: torch.Tensor) -> None:
        """Add one step's `counts` ([B]); summed when read, so one op per step while B stays the same."""
        if isinstance(self.pending, int) or self.pending.shape == counts.shape:
            self.pending = self.pending + counts
        else:
            self.pending = self.pending.sum() + counts.sum()

    def total(self, accelerator: Accelerator) -> int:
        pending = torch.as_tensor(self.pending, device=accelerator.device).sum().reshape(1)
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
