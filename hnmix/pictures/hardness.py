"""The figure of `python -m hnmix.analyze` (README, Pictures): logit histograms, false negatives
among the N hardest, synthetic negatives harder than the hardest real one, alignment and uniformity.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from hnmix.mixing import NEGATIVE_TYPES

FIGURE_INCHES = (13.0, 9.0)
DPI = 100
HARDNESS_PIXELS = (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))


def _group_labels() -> dict[str, str]:
    """The logit groups of `hnmix.evaluate.hardness.logit_groups`, a registered type each after the real ones."""
    return {"positive": "positive", "queue": "all queue negatives", "hard": "the n_hard hardest",
            **{t.name: f"{t.label} synthetic" for t in NEGATIVE_TYPES.values()}}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def hardness_figure(analysis: dict[str, Any]):
    """The figure (matplotlib Figure, HARDNESS_PIXELS at DPI) of an analysis dict."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    (hist_ax, fn_ax), (synthetic_ax, text_ax) = figure.subplots(2, 2)
    figure.suptitle(f"{analysis['checkpoint']} (step {analysis['step']}): {analysis['queries']} held-out queries "
                    f"against the queue of K={analysis['queue_size']}", fontsize=12)

    histograms = analysis["logits"]["histograms"]
    edges = histograms["edges"]
    width = edges[1] - edges[0]
    labels = _group_labels()
    for index, (name, label) in enumerate(labels.items()):
        counts = histograms.get(name) or []
        total = sum(counts)
        if not total:
            continue
        density = [c / total / width for c in counts]
        hist_ax.stairs(density, edges, color=f"C{index}", linewidth=1.6, label=f"{label} ({total})",
                       fill=name == "queue", alpha=0.35 if name == "queue" else 1.0, zorder=1 if name == "queue" else 2)
    hist_ax.set_title("Logits of one batch (divided by the temperature)", fontsize=11)
    hist_ax.set_xlabel("logit / T")
    hist_ax.set_ylabel("density")
    hist_ax.legend(fontsize=9, title="kind (values)", title_fontsize=9)
    hist_ax.grid(True, alpha=0.3)

    fn = analysis["false_negative_fraction"]
    points = [(n, 100 * f) for n, f in zip(fn["top_n"], fn["fraction"]) if _finite(f)]
    if points:
        fn_ax.plot([n for n, _ in points], [f for _, f in points], "o-", color="C3")
        fn_ax.set_xscale("log", base=2)
        if analysis.get("n_hard"):
            fn_ax.axvline(analysis["n_hard"], color="0.5", linestyle=":", label=f"n_hard = {analysis['n_hard']}")
            fn_ax.legend(fontsize=9)
    else:
        fn_ax.text(0.5, 0.5, "no labelled queue entries: false negatives unknown", transform=fn_ax.transAxes,
                   ha="center", va="center", color="0.45")
    fn_ax.set_title("False negatives (same class) among the N hardest queue negatives", fontsize=11)
    fn_ax.set_xlabel("N (log scale)")
    fn_ax.set_ylabel("% of the N hardest")
    fn_ax.grid(True, alpha=0.3)

    harder = analysis["synthetic_harder_than_hardest"]
    names = [(t.name, t.label) for t in NEGATIVE_TYPES.values()] + [("all", "all synthetic")]
    values = [100 * harder[k] if _finite(harder.get(k)) else 0.0 for k, _ in names]
    colors = [f"C{3 + i}" for i in range(len(names) - 1)] + ["0.5"]  # as in the histograms
    bars = synthetic_ax.bar([label for _, label in names], values, color=colors)
    for bar, (key, _) in zip(bars, names):
        text = f"{100 * harder[key]:.1f}%" if _finite(harder.get(key)) else "none"
        synthetic_ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                              va="bottom", fontsize=10, xytext=(0, 2), textcoords="offset points")
    synthetic_ax.set_ylim(0, max(values + [1.0]) * 1.2)
    synthetic_ax.set_title("Synthetic negatives harder than the hardest real negative", fontsize=11)
    synthetic_ax.set_ylabel("% of the synthetic negatives")
    synthetic_ax.grid(True, axis="y", alpha=0.3)

    text_ax.axis("off")
    means = analysis["logits"]["mean"]
    lines = [
        f"alignment   {analysis['alignment']:8.4f}  mean ||z1 - z2||², in 0..4",
        f"uniformity  {analysis['uniformity']:8.4f}  log mean exp(-2 ||zi - zj||²), in -8..0",
        "            (both: lower is better)",
        f"            {analysis['samples']} held-out images, query-encoder projections",
        "",
        "mean logit / T:",
        "  " + ", ".join(f"{name} {means[name]:.2f}" for name in labels if _finite(means.get(name))),
        ", ".join([f"mixing: n_hard {analysis['n_hard']}",
                   *(f"{t.size} {analysis[t.count_option]}" for t in NEGATIVE_TYPES.values()),
                   f"T {analysis['temperature']}"]),
        f"queue entries with a known class: {analysis['queue_labelled']} of {analysis['queue_size']}",
        f"queries' own keys in the queue: {'masked' if analysis.get('own_keys_masked') else 'none (a split apart)'}",
        textwrap.fill(f"held-out split: {analysis['held_out']}", 66, subsequent_indent="  "),
    ]
    text_ax.text(0.0, 1.0, "\n".join(lines), transform=text_ax.transAxes, va="top", ha="left", fontsize=9.5,
                 family="monospace", linespacing=1.6)
    text_ax.set_title("Alignment and uniformity (Wang and Isola, 2020)", fontsize=11, loc="left")
    return figure


def draw_hardness(analysis: dict[str, Any], path: str | Path) -> Path:
    """Write the figure of `analysis` as a PNG at `path`; returns it."""
    path = Path(path)
    hardness_figure(analysis).savefig(path, format="png", dpi=DPI)
    return path
