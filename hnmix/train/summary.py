"""The table printed once when training ends: what was trained, how fast, how well, and where it is."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from hnmix.pictures.curves import CURVES_FILE, METRICS_FILE, read_records


def _last(records: list[dict[str, Any]], key: str) -> Optional[dict[str, Any]]:
    return next((r for r in reversed(records) if isinstance(r.get(key), (int, float))), None)


def summary_table(*, dir_out: str | Path, first_step: int, last_step: int, total_steps: int, wall_s: float,
                  global_batch: int, checkpoint: Optional[str | Path], encoder_dir: Optional[str | Path],
                  hub_model_id: Optional[str], stopped: bool = False) -> Table:
    """The end-of-run table. Losses and kNN come from dir_out/metrics.jsonl; mean images/s is the
    wall-clock rate of this process's run (evaluations and checkpoints included). The untrained
    network's kNN is shown when metrics.jsonl has a kNN record at step 0."""
    dir_out = Path(dir_out)
    records = read_records(dir_out / METRICS_FILE) if (dir_out / METRICS_FILE).is_file() else []
    trained = last_step - first_step
    table = Table(title="hnmix.train: " + ("stopped, resume with --resume latest" if stopped else "done"),
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    resumed = f", resumed at step {first_step}" if first_step else ""
    table.add_row("steps", f"{last_step} of {total_steps} ({trained} in this run{resumed})")
    table.add_row("wall time", _duration(wall_s))
    if trained and wall_s > 0:
        table.add_row("mean images/s", f"{trained * global_batch / wall_s:.1f} (global batch {global_batch})")
    if loss := _last(records, "loss"):
        table.add_row("final loss", f"{loss['loss']:.4f} (step {loss['step']})")
    if knn := _last(records, "knn_top1"):
        table.add_row("kNN top-1 / top-5", f"{knn['knn_top1']:.2f} / {knn.get('knn_top5', math.nan):.2f} % "
                      f"(step {knn['step']})")
    untrained = next((r for r in records if r["step"] == 0 and "knn_top1" in r), None)
    if untrained:
        table.add_row("untrained kNN", f"{untrained['knn_top1']:.2f} / {untrained.get('knn_top5', math.nan):.2f} %")
    for name, path in (("checkpoint", checkpoint), ("encoder", encoder_dir), ("curves", dir_out / CURVES_FILE),
                       ("metrics", dir_out / METRICS_FILE)):
        if path is not None and Path(path).exists():
            table.add_row(name, str(path))
    if hub_model_id:
        table.add_row("Hub", f"https://huggingface.co/{hub_model_id}")
    return table


def print_summary(console: Console, **summary: Any) -> None:
    """Print `summary_table(**summary)` on `console` (the main process's)."""
    console.print(summary_table(**summary))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"
