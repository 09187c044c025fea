"""`python -m hnmix.bench learn`: does MoCHi give a better encoder than plain MoCo on this data?

Trains two arms with the same seed, data, budget and recipe, differing only in the mixing (moco:
s1_hard = s2_hard = 0; mochi: the run's), then evaluates each final checkpoint next to the
untrained network (the trainer's model built under the same seed, stem and head included) with
`python -m hnmix.evaluate`'s `knn` (the recipe's monitor settings) and `linear` protocols.
`--seeds N` repeats it with seeds seed, seed+1, ...: mean ± standard deviation and the difference
of the means, since one run's difference is often noise. Options it does not know go to
`hnmix.train`; the default is `LEARN_DEFAULTS`, sized to finish on a 2-core CPU in about 10
minutes, which a `--config` recipe replaces (as flags, they would override the recipe).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

# A small recipe on the generated set where an untrained network is near chance (16 classes).
LEARN_DEFAULTS = [
    "--dataset", "synthetic-hard", "--synthetic_size", "2048", "-a", "resnet10t", "-i", "48", "-bs", "64",
    "-km", "1024", "-dm", "128", "-mm", "0.99", "-tm", "0.2", "--optimizer", "adamw", "-lrb", "0.001",
    "--warmup_fraction", "0.05", "-lrm", "0.00001", "-nh", "64", "-s1h", "64", "-s2h", "32",
    "-st1h", "0", "-st2h", "0", "-s", "500", "--eval_every", "0", "-sp", "50", "--num_workers", "2",
]
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
ARMS = ("untrained", "moco", "mochi")


def arm_configs(config) -> dict[str, Any]:
    """{"moco": config without synthetic negatives, "mochi": config}."""
    return {"moco": config.with_options(s1_hard=0, s2_hard=0), "mochi": config}


def learn_defaults(trainer_argv: Sequence[str]) -> list[str]:
    """LEARN_DEFAULTS, or nothing when `trainer_argv` names a --config recipe: the defaults go in as
    flags, and flags override a recipe."""
    named = any(arg == "--config" or arg.startswith("--config=") for arg in trainer_argv)
    return [] if named else list(LEARN_DEFAULTS)


def evaluation_argv(model: str, config, protocol: str, json_path: Path) -> list[str]:
    """`python -m hnmix.evaluate`'s arguments for `model` under the recipe `config`: its data
    (dataset, split, columns, image size, seed), its evaluation crop and, for the kNN, its
    monitor's settings."""
    data, evaluation = config.data, config.evaluation
    argv = [model, "--protocol", protocol, "--dataset", data.dataset, "--split", data.split,
            "--image_column", data.image_column, "--img_size", str(data.img_size),
            "--eval_crop_pct", str(evaluation.eval_crop_pct), "--synthetic_size", str(data.synthetic_size),
            "--seed", str(config.run.seed), "--json", str(json_path)]
    for name in ("label_column", "dir_data", "num_workers"):  # None: each program's own default
        if getattr(data, name) is not None:
            argv += [f"--{name}", str(getattr(data, name))]
    if protocol == "knn":
        argv += ["--knn_k", str(evaluation.knn_k), "--knn_temperature", str(evaluation.knn_temperature),
                 "--knn_features", evaluation.knn_features, "--eval_max_samples", str(evaluation.eval_max_samples)]
        if evaluation.knn_split is not None:
            argv += ["--knn_split", evaluation.knn_split]
    return argv


def evaluate(model: str, config, protocol: str, json_path: Path) -> dict[str, float]:
    """kNN or linear-probe accuracies of `model` (a checkpoint directory) as `evaluation_argv` says."""
    from hnmix.evaluate.cli import build_parser, run_evaluation

    report = run_evaluation(build_parser().parse_args(evaluation_argv(model, config, protocol, json_path)))
    return {name: report[name] for name in METRICS if name in report}


def evaluate_both(model: str, config, directory: Path) -> dict[str, float]:
    return (evaluate(model, config, "knn", directory / "knn.json")
            | evaluate(model, config, "linear", directory / "linear.json"))


def untrained_checkpoint(config, directory: Path) -> Path:
    """The arms' starting point as a checkpoint `python -m hnmix.evaluate` reads: the query encoder
    (backbone with its stem, projection head) that the trainer's `build_model` makes under
    config.run.seed, in `directory/model.safetensors` beside `directory/config.yaml`."""
    from safetensors.torch import save_file

    from hnmix.evaluate.models import ENCODER_PREFIX
    from hnmix.train.components import build_model
    from hnmix.train.config import config_to_yaml

    encoder = build_model(config.model, config.method, (0, 0), seed=config.run.seed).encoder_q
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors stores contiguous tensors only (the conv weights are channels_last).
    save_file({ENCODER_PREFIX + name: tensor.contiguous() for name, tensor in encoder.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.yaml").write_text(config_to_yaml(config))
    return directory


def train_arm(config, directory: Path) -> Path:
    """Train `config` into `directory`; the path of its final checkpoint."""
    from hnmix.train.loop import train

    config = config.with_options(dir_out=str(directory), steps_save=config.optimization.steps, keep_checkpoints=1,
                                 stop_at=None, resume=None)
    train(config)
    return directory / "checkpoints" / f"step_{config.optimization.steps:08d}"


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Per metric: the runs' values, their mean and their standard deviation (0 for one run)."""
    summary: dict[str, Any] = {"runs": runs}
    for name in METRICS:
        values = [run[name] for run in runs if name in run]
        if values:
            summary[name] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary


def print_learn_report(console: Console, arms: dict[str, dict[str, Any]], seeds: int, config) -> None:
    table = Table(title=f"MoCo against MoCHi: {config.model.arch} {config.data.img_size}px on {config.data.dataset}, "
                        f"{config.optimization.steps} steps of {config.optimization.batch_size}, {seeds} seed(s) "
                        "(accuracy %, mean ± std)")
    table.add_column("arm")
    for name in METRICS:
        table.add_column(name.replace("_", " "), justify="right")
    for arm, summary in arms.items():
        table.add_row(arm, *[f"{summary[name]['mean']:.1f} ± {summary[name]['std']:.1f}" if name in summary else "-"
                             for name in METRICS])
    console.print(table)
    for name in METRICS:
        if name in arms["moco"] and name in arms["mochi"]:
            gap = arms["mochi"][name]["mean"] - arms["moco"][name]["mean"]
            spread = max(arms["mochi"][name]["std"], arms["moco"][name]["std"])
            if seeds == 1:
                verdict = "one seed: no spread to judge it by; use --seeds 3 or more"
            else:
                verdict = "within the spread of the seeds" if abs(gap) <= spread else "beyond the spread of the seeds"
            console.print(f"MoCHi - MoCo {name}: {gap:+.1f} points ({verdict})")


def run_learn(args: argparse.Namespace, trainer_argv: Sequence[str]) -> dict[str, Any]:
    """Both arms for each seed, evaluated next to the untrained network; the JSON payload."""
    from hnmix.train.config import parse_config

    base = parse_config([*learn_defaults(trainer_argv), *trainer_argv])
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="hnmix-learn-") as tmp:
        for offset in range(args.seeds):
            seeded = base.with_options(seed=base.run.seed + offset)
            where = Path(tmp) / f"seed{seeded.run.seed}"
            untrained = untrained_checkpoint(seeded, where / "untrained")
            runs["untrained"].append(evaluate_both(str(untrained), seeded, untrained))
            for arm, config in arm_configs(seeded).items():
                checkpoint = train_arm(config, where / arm)
                runs[arm].append(evaluate_both(str(checkpoint), config, where / arm))
    arms = {arm: summarise(values) for arm, values in runs.items()}
    print_learn_report(Console(), arms, args.seeds, base)
    return {"arms": arms, "seeds": [base.run.seed + offset for offset in range(args.seeds)],
            "mochi_minus_moco": {name: arms["mochi"][name]["mean"] - arms["moco"][name]["mean"]
                                 for name in METRICS if name in arms["mochi"] and name in arms["moco"]},
            "config": base.options()}
