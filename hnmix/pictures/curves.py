"""The training curves of one run, or of several overlaid, from their `metrics.jsonl` (the panels:
`PANELS`). The trainer redraws `dir_out/curves.png` at every checkpoint and at the end
(`refresh_curves`); `python -m hnmix.plot` draws the same figure for any runs. A resumed run's
metrics.jsonl holds one record per step, so its curve is one line.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional, Sequence

import yaml

from hnmix.errors import ConfigError, describe
from hnmix.mixing import NEGATIVE_TYPES
from hnmix.run_config import load_run_config

if TYPE_CHECKING:
    from hnmix.references import Reference

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
FIGURE_INCHES = (14.0, 10.5)
DPI = 100
CURVES_PIXELS = (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))  # width, height of the PNG
MAX_EPOCH_LABELS = 12

# Options that say nothing about the method or the data: never in a legend.
_NOT_IN_LEGEND = {"dir_out", "dir_data", "overwrite_dir_out", "resume", "config", "report_to", "num_workers",
                  "compile_mode", "images_in_memory_gib",
                  "push_to_hub", "hub_model_id", "hub_private", "hub_strategy", "device", "stop_at", "compile",
                  "keep_checkpoints", "steps_print", "steps_save", "eval_every", "eval_max_samples",
                  "augment_device", "max_bad_fraction", "max_nonfinite_steps", "n_hard"}  # and each type's count


class Run(NamedTuple):
    """label: the legend entry; records: metrics.jsonl, one dict per step, in step order;
    config: the run's config.yaml ({} when missing)."""

    label: str
    records: list[dict[str, Any]]
    config: dict[str, Any]


class Series(NamedTuple):
    key: str
    label: str
    scale: float = 1.0  # fractions are drawn in percent


class Panel(NamedTuple):
    title: str
    ylabel: str
    fixed_series: tuple[Series, ...]
    missing: str  # what an empty panel says
    markers: bool = False  # sparse series (kNN) get a marker per point
    per_type: Optional[str] = None  # and a series of this statistic per negative type ("logit": logit_type1, ...)

    @property
    def series(self) -> tuple[Series, ...]:
        """The panel's series: its own, then one per registered negative type if `per_type`."""
        kinds = NEGATIVE_TYPES.values() if self.per_type else ()
        return self.fixed_series + tuple(Series(f"{self.per_type}_{t.name}", f"{t.label} synthetic") for t in kinds)


PANELS = (
    Panel("Loss (lr dashed, right axis)", "cross-entropy loss", (Series("loss", "loss"),), "no loss logged yet"),
    Panel("Proxy accuracy: the positive above every queue negative", "acc1 (%)",
          (Series("acc1", "acc1", 100.0),), "no acc1 logged yet"),
    Panel("kNN accuracy on the held-out split", "accuracy (%)",
          (Series("knn_top1", "top-1"), Series("knn_top5", "top-5")),
          "no kNN evaluation in this run (--eval_every 0, or no labels)", markers=True),
    Panel("Mean logits (divided by the temperature)", "logit / T",
          (Series("logit_pos", "positive"), Series("logit_hardest", "hardest queue negative")),
          "no logits logged yet", per_type="logit"),
    Panel("Hardness", "% of negatives",
          (Series("synthetic_above_pos", "synthetic above the positive", 100.0),
           Series("hard_false_negative", "false negatives among the n_hard hardest", 100.0)),
          "no synthetic negatives or labels in this run"),
    Panel("Throughput", "images / s", (Series("images_per_s", "images/s"),), "no throughput logged yet"),
)
_LINESTYLES = ("-", "--", ":", "-.")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per step in step order (a later record of a step
    updates an earlier one). A line that is not a JSON record with a step (the last line of a
    run killed while writing) is skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def load_run(dir_out: str | Path, label: Optional[str] = None) -> Run:
    """The run in `dir_out` (metrics.jsonl and config.yaml); a ConfigError naming what is missing."""
    dir_out = Path(dir_out)
    metrics = dir_out / METRICS_FILE
    if not metrics.is_file():
        raise ConfigError(f"{dir_out} has no {METRICS_FILE} (not the --dir_out of a training run, or nothing "
                          "logged yet); pass the --dir_out of a run")
    records = read_records(metrics)
    if not records:
        raise ConfigError(f"{metrics} holds no record yet; wait for the run's first log line (--steps_print)")
    try:
        config = load_run_config(dir_out / CONFIG_FILE) or {}
    except (OSError, yaml.YAMLError):  # no config.yaml, or not one: a legend without the method
        config = {}
    return Run(label or dir_out.resolve().name, records, config)


def method_of(config: dict[str, Any]) -> str:
    """'MoCo' or 'MoCHi (N=.., s1=.., s2=..)' from a run's options, a size per negative type."""
    sizes = [f"{t.size}={config.get(t.count_option) or 0}" for t in NEGATIVE_TYPES.values()]
    if not any(config.get(t.count_option) for t in NEGATIVE_TYPES.values()):
        return "MoCo"
    return f"MoCHi (N={config.get('n_hard')}, {', '.join(sizes)})"


def run_labels(names: Sequence[str], configs: Sequence[dict[str, Any]], *, most: int = 3) -> list[str]:
    """Legend entries: each run's name and method, then up to `most` options whose values differ
    among the runs (paths, cadences and other options that do not change the training left out)."""
    differing = []
    if len(configs) > 1:
        counts = {t.count_option for t in NEGATIVE_TYPES.values()}
        keys = sorted({key for config in configs for key in config} - _NOT_IN_LEGEND - counts)
        differing = [key for key in keys if len({json.dumps(c.get(key), default=str) for c in configs}) > 1]
    labels = []
    for name, config in zip(names, configs):
        label = f"{name}: {method_of(config)}" if config else name
        shown = [f"{key}={config.get(key)}" for key in differing[:most]]
        labels.append(", ".join([label] + shown))
    return labels


def steps_per_epoch_of(records: Sequence[dict[str, Any]]) -> Optional[float]:
    """The steps per epoch: as the trainer records it (`steps_per_epoch`), else, for records of an
    older hnmix, an estimate from (step, epoch) pairs: a record at step s in epoch e has
    e * spe < s <= (e + 1) * spe. The middle of the interval all records allow; None before the
    first epoch ends."""
    recorded = [r["steps_per_epoch"] for r in records if isinstance(r.get("steps_per_epoch"), int)]
    if recorded:
        return float(recorded[-1])
    pairs = [(r["step"], r["epoch"]) for r in records if isinstance(r.get("epoch"), int) and r["step"] > 0]
    later = [(s, e) for s, e in pairs if e > 0]
    if not later:
        return None
    low = max(s / (e + 1) for s, e in pairs)
    high = min((s - 1) / e for s, e in later)
    return (low + high) / 2 if high >= low else low


def reference_points(knn_top1_by_epoch: Mapping[int, float], steps_per_epoch: float,
                     last_step: float) -> list[tuple[float, float]]:
    """A published curve placed on a run's step axis: [(step, kNN top-1)], in epoch order.

    The source's epoch n (1-based: its kNN after n epochs) sits at the end of the run's n-th
    epoch, x = n * steps_per_epoch. Kept: the epochs up to `last_step` (the furthest step a run
    reached), then the next one, so the curve shows where the run is heading and stops there.
    """
    points = []
    for epoch in sorted(knn_top1_by_epoch):
        step = epoch * steps_per_epoch
        points.append((step, float(knn_top1_by_epoch[epoch])))
        if step > last_step:
            break
    return points


def _values(records: Sequence[dict[str, Any]], series: Series) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(series.key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record["step"])
            values.append(value * series.scale)
    return steps, values


def curves_figure(runs: Sequence[Run], reference: Optional[Reference] = None):
    """The figure (a `matplotlib.figure.Figure`, CURVES_PIXELS at DPI) of `runs` overlaid.

    One run: a colour per series. Several: a colour per run (legend at the top) and a line style
    per series (legend in each panel). Epochs are marked from the first run's records.
    `reference` (hnmix.references): its published kNN top-1 curve on the kNN panel, a black
    dashed line placed by the first run's epochs (`reference_overlay`).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    overlay = reference_overlay(runs, reference) if reference is not None else []
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    axes = figure.subplots(3, 2, sharex=True).flatten()
    palette = [f"C{i}" for i in range(10)]
    several = len(runs) > 1
    for panel_index, (ax, panel) in enumerate(zip(axes, PANELS)):
        drawn = False
        for run_index, run in enumerate(runs):
            for series_index, series in enumerate(panel.series):
                steps, values = _values(run.records, series)
                if not steps:
                    continue
                drawn = True
                colour = palette[run_index % 10] if several else palette[series_index % 10]
                style = _LINESTYLES[series_index % len(_LINESTYLES)] if several else "-"
                ax.plot(steps, values, style, color=colour, linewidth=1.6,
                        marker="o" if panel.markers else None, markersize=4, label=series.label)
            if panel_index == 0:
                drawn |= _draw_lr(ax, run, palette[run_index % 10] if several else "C1", several)
        published = _draw_reference(ax, overlay, reference) if overlay and panel.series[0].key == "knn_top1" else None
        ax.set_title(_panel_title(panel, runs), fontsize=11)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, panel.missing, transform=ax.transAxes, ha="center", va="center", color="0.45",
                    fontsize=10, wrap=True)
            if published is None:
                ax.set_yticks([])
        if drawn and len(panel.series) > 1 or published is not None:
            if several:
                handles = [Line2D([], [], color="0.2", linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=s.label)
                           for i, s in enumerate(panel.series)] if drawn else []
                ax.legend(handles=handles + ([published] if published is not None else []), fontsize=9, loc="best")
            else:
                ax.legend(fontsize=9, loc="best")
    for ax in axes[4:]:
        ax.set_xlabel("optimizer step")
    if runs:
        _mark_epochs(axes, runs[0].records)
    if several:
        handles = [Line2D([], [], color=palette[i % 10], linewidth=2.5, label=label)
                   for i, label in enumerate(run.label for run in runs)]
        figure.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 3), fontsize=10)
    else:
        figure.suptitle(_title(runs[0]) if runs else "no run", fontsize=13)
    return figure


def reference_overlay(runs: Sequence[Run], reference: Reference) -> list[tuple[float, float]]:
    """`reference_points` of `reference` for `runs`: placed by the first run's steps per epoch,
    up to the furthest step any run reached. A ConfigError when the first run's steps per epoch
    are unknown (records of an older hnmix, before the end of their first epoch)."""
    if not runs:
        return []
    steps_per_epoch = steps_per_epoch_of(runs[0].records)
    if not steps_per_epoch:
        raise ConfigError(f"run '{runs[0].label}' has not finished an epoch yet, so the reference's epochs cannot be "
                          "placed on its steps; plot it after its first epoch, or without --reference")
    last_step = max(run.records[-1]["step"] for run in runs if run.records)
    return reference_points(reference.knn_top1_by_epoch, steps_per_epoch, last_step)


def _draw_reference(ax, points: Sequence[tuple[float, float]], reference: Reference):
    """The published curve on the kNN panel `ax`: black, dashed, small markers; returns its line.
    Its long dashes and diamonds set it apart from the runs' dashed top-5 when several are drawn."""
    steps, values = zip(*points)
    (line,) = ax.plot(steps, values, color="black", linestyle=(0, (7, 3)), linewidth=1.4, marker="D", markersize=3,
                      zorder=3, label=f"{reference.title}, top-1")
    return line


def _panel_title(panel: Panel, runs: Sequence[Run]) -> str:
    """The panel's title; the kNN panel names the split its records say they classified."""
    splits = {r["knn_split"] for run in runs for r in run.records if isinstance(r.get("knn_split"), str)}
    if panel.series[0].key == "knn_top1" and len(splits) == 1:
        return f"kNN accuracy on the {splits.pop()} split"
    return panel.title


def _draw_lr(ax, run: Run, colour: str, several: bool) -> bool:
    from matplotlib.ticker import FuncFormatter

    steps, values = _values(run.records, Series("lr", "learning rate"))
    if not steps:
        return False
    twin = getattr(ax, "_hnmix_lr_axis", None)
    if twin is None:
        twin = ax._hnmix_lr_axis = ax.twinx()
        twin.set_ylabel("learning rate")
        # Plain labels (2.5e-04): an axis offset text would sit under the epoch labels.
        twin.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))
    twin.plot(steps, values, "--", color=colour, linewidth=1.2, alpha=0.8)
    if not several:
        ax.tick_params(axis="y", labelcolor="C0")
        twin.tick_params(axis="y", labelcolor=colour)
    return True


def _mark_epochs(axes, records: Sequence[dict[str, Any]]) -> None:
    """Dotted lines at the estimated epoch boundaries, labelled along the top panels."""
    spe = steps_per_epoch_of(records)
    if not spe:
        return
    last_epoch = max(r.get("epoch", 0) for r in records)
    every = max(1, math.ceil(last_epoch / MAX_EPOCH_LABELS))
    for epoch in range(every, last_epoch + 1, every):
        for index, ax in enumerate(axes):
            ax.axvline(epoch * spe, color="0.6", linestyle=":", linewidth=0.9, zorder=0)
            if index < 2:
                ax.text(epoch * spe, 1.0, f" ep {epoch}", transform=ax.get_xaxis_transform(), fontsize=8,
                        color="0.4", ha="left", va="top")


def _title(run: Run) -> str:
    config, last = run.config, run.records[-1]["step"] if run.records else 0
    what = f"{config.get('arch', '?')} on {config.get('dataset', '?')}, {method_of(config)}" if config else ""
    of = f" of {config['steps']}" if config.get("steps") else ""
    return f"{run.label}: {what}, step {last}{of}" if what else f"{run.label}: step {last}"


def draw_curves(runs: Sequence[Run], path: str | Path, reference: Optional[Reference] = None) -> Path:
    """Write the figure of `runs` (and `reference`'s curve, see `curves_figure`) as a PNG at
    `path` (atomically: a reader never sees half a file)."""
    path = Path(path)
    figure = curves_figure(runs, reference)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=DPI)
    partial.replace(path)
    return path


def refresh_curves(dir_out: str | Path) -> Optional[Path]:
    """Redraw `dir_out/curves.png` from the run's metrics.jsonl; returns the path, or None when
    nothing is logged yet or drawing failed. A failure is one warning: a picture never ends a run."""
    dir_out = Path(dir_out)
    if not (dir_out / METRICS_FILE).is_file():
        return None
    try:
        return draw_curves([load_run(dir_out)], dir_out / CURVES_FILE)
    except ConfigError:
        return None
    except Exception as error:  # noqa: BLE001 - whatever went wrong in drawing, training goes on
        logger.warning(f"could not draw {dir_out / CURVES_FILE} ({describe(error)}); training goes on")
        return None


def copy_curves(dir_out: str | Path, directory: str | Path) -> Optional[str]:
    """Copy `dir_out/curves.png` into `directory` (e.g. the exported encoder, for the model card
    and the Hub); returns the file's name there, or None when there is no picture."""
    source = Path(dir_out) / CURVES_FILE
    if not source.is_file():
        return None
    try:
        shutil.copyfile(source, Path(directory) / CURVES_FILE)
    except OSError as error:
        logger.warning(f"could not copy {source} to {directory} ({describe(error)})")
        return None
    return CURVES_FILE

