"""`python -m tools.gpu_learn DATA_DIR [OUT]` (launch/gpu_learn.sh): MoCo's own CIFAR-10
demo trained by hnmix on a GPU for the minutes a GPU is lent, beside the demo's published curve.

    python -m tools.gpu_learn DATA_DIR [OUT] [--dry-run] [--budget_s S] [--arms moco,mochi]

DATA_DIR is CIFAR-10 laid out like the Hub's `uoft-cs/cifar10` (a copy of ../shared/data/cifar10
inside the checkout travels with the device tool: 56 MB, under its 64 MiB). Sections, in order:

  setup   the wheels in .whl/ installed, the environment probed (tools/gpu_check.py's set-up)
  moco    configs/moco_cifar10.yaml (the demo's recipe, 200-epoch schedule) in bf16, stopped
          cleanly (SIGINT: the step finishes, a checkpoint is saved) when its time is up:
          about 7 minutes (--budget_s 480 less the set-up and MoCHi's minimum)
  mochi   configs/mochi_cifar10.yaml alike, with the time left (skipped under 60 s)

The kNN monitor runs after every epoch (the recipe's `eval_every: 1ep`), so each epoch reached
has its kNN top-1 on the 10,000 test images. Written to OUT (default: $OUT):
  gpu_learn.json  each arm's per-epoch kNN, images/s, seconds per epoch, peak GPU memory, the
                  environment, and the published curve beside them
  gpu_learn.md    the table for BENCHMARKS.md, headed by card, torch and date
  gpu_learn.log   every command's output
  moco/, mochi/   the runs' metrics.jsonl and config.yaml (their checkpoints are left out)
The goal (BENCHMARKS.md): the published kNN at every epoch reached, within 1 point (JPEG aside),
at 10x the demo's speed or more. `--dry-run`: the same on the CPU at tiny sizes, for CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hnmix.references import load_reference
from tools.gpu_check import (
    REPO,
    Check,
    SectionFailed,
    SectionTimeout,
    add_run_arguments,
    environment_line,
    run_setup,
    started_check,
)

JSON_FILE, TABLE_FILE = "gpu_learn.json", "gpu_learn.md"  # and gpu_learn.log (started_check)
BUDGET_S = {"gpu": 480, "dry-run": 480}
MOCO_SHARE_S = 420  # "about 7 minutes" for the demo's recipe
MIN_ARM_S = 60
ARMS = ("moco", "mochi")
REFERENCE = "moco_cifar10_demo"
SPEEDUP_GOAL = 10.0
KNN_TOLERANCE = 1.0  # points
# Tiny sizes for the CPU: the recipe's options, shrunk (the data is the caller's small CIFAR layout).
DRY_RUN_OPTIONS = ["--device", "cpu", "--batch_size", "16", "--k_moco", "64", "--steps", "4", "--num_workers", "1",
                   "--steps_print", "2", "--bn_splits", "2"]
DRY_RUN_MOCHI = ["--n_hard", "16", "--s1_hard", "8", "--s2_hard", "4", "--start1_hard", "1ep", "--start2_hard", "1ep"]


def arm_command(arm: str, data_dir: Path, dir_out: Path, *, dry_run: bool, cores: int) -> list[str]:
    """The `hnmix.train` command line of an arm: its recipe on `data_dir`, no Hub, bf16 on the GPU."""
    command = [sys.executable, "-m", "hnmix.train", "--config", str(REPO / f"configs/{arm}_cifar10.yaml"),
               "--dataset", str(data_dir), "--dir_out", str(dir_out), "--overwrite_dir_out", "--keep_checkpoints", "1",
               "--eval_at_start"]
    if dry_run:
        return command + DRY_RUN_OPTIONS + (DRY_RUN_MOCHI if arm == "mochi" else [])
    return command + ["--mixed_precision", "bf16", "--num_workers", str(max(1, cores - 2))]


def read_metrics(dir_out: Path) -> list[dict[str, Any]]:
    path = dir_out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarise(records: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """An arm's results from its metrics.jsonl: kNN top-1 of the untrained network (the step-0
    record) and by epoch completed (the monitor runs at an epoch's last step, whose record carries
    that epoch), throughput over the logged windows after the first (which holds start-up and
    compilation), peak GPU memory."""
    knn = {record["epoch"] + 1: record["knn_top1"] for record in records if "knn_top1" in record and record["step"] > 0}
    untrained = next((record["knn_top1"] for record in records if record["step"] == 0 and "knn_top1" in record), None)
    speeds = [record["images_per_s"] for record in records if "images_per_s" in record]
    steady = speeds[1:] or speeds
    peaks = [record["memory_peak_gib"] for record in records if "memory_peak_gib" in record]
    return {"knn_top1_untrained": untrained, "knn_top1_by_epoch": knn, "epochs": max(knn, default=0), "steps": max((r["step"] for r in records), default=0),
            "images_per_s": sum(steady) / len(steady) if steady else None,
            "memory_peak_gib": max(peaks) if peaks else None, "wall_s": round(wall_s, 1)}


def run_arm(check: Check, arm: str, data_dir: Path, seconds: float) -> dict[str, Any]:
    """Train `arm` for at most `seconds`; a run stopped at its time limit is a success."""
    dir_out = check.out / arm
    check.section_deadline = time.monotonic() + seconds
    started = time.monotonic()
    check.say(f"{arm}: up to {seconds:.0f} s")
    try:
        code = check.run(arm_command(arm, data_dir, dir_out, dry_run=check.dry_run, cores=check.cores))
        status = "finished" if code == 0 else "stopped" if code == 75 else f"failed (exit {code})"
    except SectionTimeout:
        status = "stopped at its time limit"
    shutil.rmtree(dir_out / "checkpoints", ignore_errors=True)  # the device tool brings back OUT: keep it small
    shutil.rmtree(dir_out / "encoder", ignore_errors=True)
    result = {"status": status} | summarise(read_metrics(dir_out), time.monotonic() - started)
    check.say(f"{arm}: {status}, {result['epochs']} epochs, kNN {result['knn_top1_by_epoch']}")
    return result


def comparison_rows(arms: dict[str, dict[str, Any]], published: dict[int, float]) -> list[dict[str, Any]]:
    """Epoch 0 (the untrained networks), then one row per epoch any arm reached: the published
    kNN, each arm's, MoCo's difference."""
    epochs = sorted({epoch for result in arms.values() for epoch in result.get("knn_top1_by_epoch", {})})
    rows = [{"epoch": 0, "published": None} | {arm: result.get("knn_top1_untrained") for arm, result in arms.items()}]
    for epoch in epochs:
        row = {"epoch": epoch, "published": published.get(epoch)}
        for arm, result in arms.items():
            row[arm] = result.get("knn_top1_by_epoch", {}).get(epoch)
        if row.get("moco") is not None and row["published"] is not None:
            row["moco_minus_published"] = round(row["moco"] - row["published"], 2)
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    reference = report["reference"]
    arms = report["arms"]
    lines = [f"### CIFAR-10, MoCo's demo recipe: {report['environment_line']}, {report['started_at'][:10]}"
             f"{' (dry run on the CPU, tiny sizes)' if report['mode'] == 'dry-run' else ''}", "",
             "| epoch | published kNN (demo) | " + " | ".join(f"hnmix {arm}" for arm in arms) + " | moco - published |",
             "|---:|---:|" + "---:|" * len(arms) + "---:|"]
    for row in report["rows"]:
        cells = [str(row["epoch"] or "0 (untrained)"), _number(row["published"])] + [_number(row.get(arm)) for arm in arms]
        lines.append("| " + " | ".join(cells + [_number(row.get("moco_minus_published"), signed=True)]) + " |")
    lines += ["", "| arm | status | epochs | images/s | s per epoch | speed vs the demo | peak GPU memory |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for arm, result in arms.items():
        speed = result.get("images_per_s")
        per_epoch = reference["train_images"] / speed if speed else None
        lines.append(f"| {arm} | {result['status']} | {result.get('epochs', 0)} | {_number(speed, 0)} | "
                     f"{_number(per_epoch, 1)} | {_number(speed / reference['images_per_s'] if speed else None, 1)}x | "
                     f"{_number(result.get('memory_peak_gib'), 2)} GiB |")
    lines += ["", f"Goal: the published kNN at every epoch reached (within {KNN_TOLERANCE:g} point, JPEG aside) at "
              f"{SPEEDUP_GOAL:g}x the demo's {reference['images_per_s']:.0f} images/s or more "
              f"({reference['title']}).", ""]
    return "\n".join(lines)


def _number(value: Optional[float], digits: int = 2, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_learn", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="CIFAR-10 laid out like uoft-cs/cifar10")
    add_run_arguments(parser, BUDGET_S, dry_run="on the CPU at tiny sizes")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of moco, mochi")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        parser.error(f"DATA_DIR {args.data_dir} is not a folder; copy ../shared/data/cifar10 into the checkout")
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not arms or any(arm not in ARMS for arm in arms):
        parser.error(f"--arms takes {', '.join(ARMS)}")
    reference = load_reference(REFERENCE)
    results: dict[str, dict[str, Any]] = {}
    with started_check("gpu_learn", args, parser, BUDGET_S, "launch/gpu_learn.sh DATA_DIR OUT") as check:
        out = check.out
        check.say(f"{check.mode}, {check.budget_s:.0f} s at most, arms {', '.join(arms)}; writing to {out}")
        check.section_deadline = time.monotonic() + min(120.0, check.budget_s / 4)
        try:
            setup = run_setup(check)
        except (SectionFailed, SectionTimeout) as error:
            check.say(f"set-up failed: {error}")
            setup = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], dict) else {}
        for index, arm in enumerate(arms):
            left = check.deadline - time.monotonic()
            later = MIN_ARM_S * (len(arms) - index - 1)
            seconds = min(MOCO_SHARE_S, left - later) if arm == "moco" and later else left
            if seconds < MIN_ARM_S:
                results[arm] = {"status": f"skipped: {max(0, left):.0f} s left"}
                continue
            results[arm] = run_arm(check, arm, args.data_dir, seconds)
        environment = setup.get("environment") or {}
        report = {"mode": check.mode, "started_at": check.started.isoformat(timespec="seconds"),
                  "budget_s": check.budget_s, "environment": environment,
                  "environment_line": environment_line(environment),
                  "reference": {"name": REFERENCE, "title": reference.title, "images_per_s": reference.images_per_s,
                                "train_images": reference.train_images},
                  "arms": results, "rows": comparison_rows(results, reference.knn_top1_by_epoch)}
        report["table"] = markdown(report)
        (out / JSON_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (out / TABLE_FILE).write_text(report["table"])
        print("\n" + report["table"], flush=True)
    trained = [result for result in results.values() if "epochs" in result]
    return 0 if trained and all(not result["status"].startswith("failed") for result in trained) else 1


if __name__ == "__main__":
    sys.exit(main())
