"""What a person reads while a run trains: one short line per metrics record, where the trackers
write, and no rank tag on a single process.

A record's line leads with what tells how the run goes: step, loss, learning rate, the proxy
accuracy (acc1, the positive above every queue negative) and kNN top-1/top-5 when evaluated,
then images/s, and unreadable images (`bad`, in all so far) or skipped steps when there are any.
Every other statistic, the epoch included, is in metrics.jsonl (and on a debug line:
ACCELERATE_LOG_LEVEL=debug). Up to images/s the line fits MESSAGE_WIDTH even at 6-digit steps,
so with the time and level columns of the rich log handler a record takes one line of a
120-column terminal.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator

LINE_WIDTH = 120
MESSAGE_WIDTH = LINE_WIDTH - 20  # RichHandler's "[12:34:56] " time and "INFO     " level columns
_LEADING = ("step", "loss", "lr", "acc1", "knn_top1", "knn_top5", "images_per_s", "bad_samples",
            "skipped_steps")


def format_record(record: dict[str, Any], total_steps: int) -> str:
    """The log line of a metrics record (see the module docstring), e.g.
    `step 500/25000  loss 7.4123  lr 1.23e-04  acc1 51.2%  kNN 23.4/45.6%  812 img/s`."""
    parts = [f"step {record['step']}/{total_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "acc1" in record:
        parts.append(f"acc1 {100 * record['acc1']:.1f}%")
    if "knn_top1" in record:
        parts.append(f"kNN {record['knn_top1']:.1f}/{record.get('knn_top5', float('nan')):.1f}%")
    if "images_per_s" in record:
        parts.append(f"{record['images_per_s']:.0f} img/s")
    for key, label in (("bad_samples", "bad"), ("skipped_steps", "skipped")):
        if record.get(key):
            parts.append(f"{label} {record[key]}")
    return "  ".join(parts)


def format_details(record: dict[str, Any]) -> str:
    """The statistics `format_record` leaves out, `name value` each (the debug line)."""
    return "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in record.items() if key not in _LEADING)


class DropRankTag(logging.Filter):
    """Removes the `[RANK 0] ` that Accelerate's logger puts before every message, which says
    nothing on a single process."""

    TAG = "[RANK 0] "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.TAG):
            record.msg = record.msg[len(self.TAG):]
        return True


def tracker_locations(accelerator: Accelerator) -> list[str]:
    """Where each of the run's trackers writes, one phrase each (main process; [] without trackers)."""
    places = []
    for tracker in accelerator.trackers:
        name = getattr(tracker, "name", type(tracker).__name__)
        logging_dir = getattr(tracker, "logging_dir", None)
        url = getattr(getattr(tracker, "run", None), "url", None)  # wandb's run page
        if name == "tensorboard" and logging_dir:
            places.append(f"tensorboard to {logging_dir} (view it with: tensorboard --logdir {logging_dir})")
        elif url:
            places.append(f"{name} to {url}")
        elif logging_dir:
            places.append(f"{name} to {logging_dir}")
        else:
            places.append(f"{name} (its own default location)")
    return places
