"""`python -m hnmix.evaluate MODEL --protocol knn|linear`: frozen-feature evaluation from the command line.

The math is in `hnmix.evaluate.probes`, the splits and features in `hnmix.evaluate.splits` and
`hnmix.evaluate.features`, the models in `hnmix.evaluate.models`. Protocol, in short: the kNN
bank is the train split and its queries the held-out split (the dataset's `validation` split,
else a fixed stratified part of the train split). The linear probe trains on the train split,
picks lr and weight decay on the held-out split, and reports on `test` (when there is no test
split the held-out split doubles as test, which flatters the number; the JSON says which split
played which role).

Logging goes through the standard `logging` module; results on several processes are computed on
the main process and broadcast, so every rank returns the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
import torch
import torch.utils.data
from accelerate import Accelerator
from accelerate.utils import set_seed

from hnmix.errors import ConfigError, HnmixError
from hnmix.evaluate.features import EvalImages, extract_features, make_eval_loader
from hnmix.evaluate.models import LoadedModel, load_backbone
from hnmix.evaluate.monitor import broadcast_from_main
from hnmix.evaluate.probes import (
    LINEAR_LRS,
    LINEAR_WEIGHT_DECAYS,
    knn_accuracy,
    train_linear_probe,
)
from hnmix.evaluate.splits import DEFAULT_SEED, load_eval_splits

logger = logging.getLogger("hnmix.evaluate")  # not __name__: that is "__main__" under python -m


DEFAULT_DATASET = "ilee0022/Caltech-256"


def _split_size(text: str) -> Union[int, float]:
    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor a count") from None
    return value


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.evaluate",
        description="kNN or linear-probe accuracy of a frozen encoder on a labelled dataset. "
        "Run it as `accelerate launch -m hnmix.evaluate ...` to share the feature extraction among processes.",
    )
    parser.add_argument("model", help="a checkpoint directory (DIR_OUT/checkpoints/step_N), an exported encoder "
                        "folder (DIR_OUT/encoder), a Hub id (hf-hub:owner/name or owner/name) or a timm model name")
    parser.add_argument("--protocol", choices=("knn", "linear"), default="knn", help="(default: knn)")
    parser.add_argument("--pretrained", action="store_true", help="a timm model name: use timm's pretrained weights")
    data = parser.add_argument_group("DATA (defaults: a checkpoint's training config, else the values shown)")
    data.add_argument("--dataset", help=f"Hub id, local dataset repo, image folder, save_to_disk directory, or "
                      f"`synthetic` (default: {DEFAULT_DATASET})")
    data.add_argument("--split", help="the train split: kNN bank / linear training data (default: train)")
    data.add_argument("--image_column", help="(default: image)")
    data.add_argument("--label_column", help="(default: `label` if present, else the first ClassLabel column)")
    data.add_argument("--synthetic_size", type=int, help="images per split of --dataset synthetic (default: 512)")
    data.add_argument("--dir_data", help="cache directory of `datasets`")
    data.add_argument("--seed", type=int, help=f"seed of synthetic data, the held-out split, subsets, the linear "
                      f"probe and a random-init timm model (default: {DEFAULT_SEED})")
    data.add_argument("--img_size", type=int, help="evaluation crop (default: the checkpoint's img_size, the "
                      "encoder's input_size, else 224)")
    data.add_argument("--eval_split_size", type=_split_size, default=0.1, help="held-out part of the train split "
                      "when there is no validation split: a fraction or a count (default: 0.1)")
    data.add_argument("--eval_max_samples", type=int, help="at most this many images per split, a seeded subset "
                          "(default: all)")
    data.add_argument("--batch_size", type=int, default=128, help="per process (default: 128)")
    data.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per process (default: 4)")
    data.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="(default: the accelerate config)")
    proto = parser.add_argument_group("PROTOCOLS")
    proto.add_argument("--knn_k", type=int, default=200, help="neighbours (default: 200)")
    proto.add_argument("--knn_temperature", type=float, default=0.1, help="vote weight exp(sim / T) (default: 0.1)")
    proto.add_argument("--linear_lrs", type=_float_list, default=LINEAR_LRS,
                       help=f"Adam learning rates to choose from (default: {','.join(map(str, LINEAR_LRS))})")
    proto.add_argument("--linear_weight_decays", type=_float_list, default=LINEAR_WEIGHT_DECAYS,
                       help=f"L2 penalties to choose from (default: {','.join(map(str, LINEAR_WEIGHT_DECAYS))})")
    proto.add_argument("--linear_epochs", type=int, default=10, help="(default: 10)")
    proto.add_argument("--linear_batch_size", type=int, default=256, help="(default: 256)")
    parser.add_argument("--json", help="where to write the results (default: MODEL/evaluation_PROTOCOL.json for a "
                        "checkpoint or encoder directory, no file for a Hub or timm model)")
    return parser


@dataclass
class EvalOptions:
    """The command line with the checkpoint's defaults filled in."""

    args: argparse.Namespace
    dataset: str
    split: str
    image_column: str
    label_column: Optional[str]
    synthetic_size: int
    dir_data: Optional[str]
    seed: int
    img_size: int


def resolve_options(args: argparse.Namespace, model: LoadedModel) -> EvalOptions:
    """Flags win; then a checkpoint's training config; then hnmix's defaults."""
    trained = model.train_config

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else trained.get(name, default)

    options = EvalOptions(
        args=args, dataset=pick("dataset", DEFAULT_DATASET), split=pick("split", "train"),
        image_column=pick("image_column", "image"), label_column=pick("label_column", None),
        synthetic_size=pick("synthetic_size", 512), dir_data=pick("dir_data", None), seed=pick("seed", DEFAULT_SEED),
        img_size=args.img_size or model.img_size or 224,
    )
    positive = {"img_size": options.img_size, "batch_size": args.batch_size, "knn_k": args.knn_k,
                "linear_epochs": args.linear_epochs, "linear_batch_size": args.linear_batch_size,
                "synthetic_size": options.synthetic_size}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"option {name} must be >= 1, got {value}")
    if args.num_workers < 0:
        raise ConfigError(f"option num_workers must be >= 0, got {args.num_workers}")
    if not args.knn_temperature > 0:
        raise ConfigError(f"option knn_temperature must be > 0, got {args.knn_temperature}")
    if args.protocol == "linear" and not (args.linear_lrs and args.linear_weight_decays):
        raise ConfigError("options linear_lrs and linear_weight_decays need at least one value each")
    return options


def default_json_path(args: argparse.Namespace, model: LoadedModel) -> Optional[Path]:
    if args.json:
        return Path(args.json)
    if model.kind in ("checkpoint", "encoder"):
        return Path(model.source) / f"evaluation_{args.protocol}.json"
    return None


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """The whole CLI run; returns the report (the same on every rank) after printing and writing it."""
    accelerator = _make_accelerator(args.mixed_precision)
    _configure_logging(accelerator)
    set_seed(args.seed if args.seed is not None else DEFAULT_SEED)  # a random-init baseline: the same weights on every rank
    with accelerator.main_process_first():
        model = load_backbone(args.model, pretrained=args.pretrained)
    options = resolve_options(args, model)
    json_path = default_json_path(args, model)
    if json_path is not None:
        _check_writable(json_path)  # on every rank, before the work: all ranks stop together
    with accelerator.main_process_first():
        splits = load_eval_splits(
            options.dataset, split=options.split, image_column=options.image_column,
            label_column=options.label_column, eval_split_size=args.eval_split_size,
            max_samples=args.eval_max_samples, seed=options.seed, cache_dir=options.dir_data,
            synthetic_size=options.synthetic_size, with_test=args.protocol == "linear",
        )
    backbone = model.backbone.to(accelerator.device)

    def features_of(dataset: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        images = EvalImages(dataset, image_column=splits.image_column, label_column=splits.label_column,
                            img_size=options.img_size)
        loader = accelerator.prepare(make_eval_loader(images, batch_size=args.batch_size, num_workers=args.num_workers))
        return extract_features(backbone, loader, accelerator)

    started = time.perf_counter()
    train_f, train_y = features_of(splits.train)
    held_f, held_y = features_of(splits.held_out)
    test_f, test_y = features_of(splits.test) if splits.test is not None else (held_f, held_y)
    extraction_s = time.perf_counter() - started
    settings: dict[str, Any] = {"img_size": options.img_size, "batch_size": args.batch_size,
                                "eval_split_size": args.eval_split_size, "eval_max_samples": args.eval_max_samples,
                                "seed": options.seed, "mixed_precision": accelerator.mixed_precision,
                                "num_processes": accelerator.num_processes}
    metrics = None
    if accelerator.is_main_process:
        started = time.perf_counter()
        if args.protocol == "knn":
            settings |= {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature}
            metrics = knn_accuracy(train_f, train_y, held_f, held_y, num_classes=splits.num_classes,
                                   k=args.knn_k, temperature=args.knn_temperature)
        else:
            settings |= {"linear_lrs": list(args.linear_lrs), "linear_weight_decays": list(args.linear_weight_decays),
                         "linear_epochs": args.linear_epochs, "linear_batch_size": args.linear_batch_size,
                         "linear_features": "standardised with the fitting split's mean and std",
                         "linear_refit_on_train_and_val": splits.test is not None}
            metrics = train_linear_probe(train_f, train_y, held_f, held_y, test_f, test_y,
                                         num_classes=splits.num_classes, lrs=args.linear_lrs,
                                         weight_decays=args.linear_weight_decays, epochs=args.linear_epochs,
                                         batch_size=args.linear_batch_size, seed=options.seed,
                                         refit_on_train_and_val=splits.test is not None)
        metrics |= {"seconds_features": extraction_s, "seconds_protocol": time.perf_counter() - started}
    metrics = broadcast_from_main(metrics, accelerator)
    report = {**metrics, "protocol": args.protocol, "model": model.describe(),
              "dataset": {"source": options.dataset, "split": options.split,
                          **splits.describe(with_test=args.protocol == "linear")},
              "settings": settings, "json": str(json_path) if json_path else None}
    if accelerator.is_main_process:
        if json_path is not None:
            _write_json(json_path, report)
        _print_table(report)
    accelerator.wait_for_everyone()
    return report


def _make_accelerator(mixed_precision: Optional[str]) -> Accelerator:
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except (ValueError, ImportError) as error:
        raise ConfigError(f"cannot set up Accelerate: {str(error).splitlines()[0]}") from None


def _configure_logging(accelerator: Accelerator) -> None:
    """INFO lines of hnmix on the main process's stderr (rich), errors only elsewhere."""
    from rich.console import Console
    from rich.logging import RichHandler

    hnmix_logger = logging.getLogger("hnmix")
    if accelerator.is_main_process:
        hnmix_logger.setLevel(logging.INFO)
        if not any(isinstance(h, RichHandler) for h in hnmix_logger.handlers):
            console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
            hnmix_logger.addHandler(RichHandler(console=console, show_path=False))
    else:
        hnmix_logger.setLevel(logging.ERROR)
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def _check_writable(path: Path) -> None:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write the results to {path} (not a writable file); pass --json PATH")


def _write_json(path: Path, report: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as error:
        raise ConfigError(f"cannot write the results to {path} ({error.strerror or error}); pass --json PATH") from None
    logger.info("wrote %s", path)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    dataset = report["dataset"]
    table = Table(title=f"hnmix.evaluate: {report['protocol']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model", f"{report['model']['source']} ({report['model']['arch']})")
    table.add_row("dataset", f"{dataset['source']}, {dataset['num_classes']} classes")
    for role in dataset["sizes"]:
        table.add_row(role, f"{dataset['sizes'][role]} images: {dataset[role]}")
    for name, value in report.items():
        if name.startswith(("knn_", "linear_")) and isinstance(value, float):
            table.add_row(name, f"{value:.2f}" if name.endswith(("top1", "top5")) else f"{value:g}")
    if report["json"]:
        table.add_row("json", report["json"])
    Console(soft_wrap=True).print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_evaluation(args)
    except HnmixError as error:
        if os.environ.get("RANK", "0") == "0":
            # An error raised in a DataLoader worker arrives with the worker's traceback before it.
            line = str(error).strip().splitlines()[-1]
            sys.stderr.write(f"hnmix: error: {line}\n")
        return 2
    return 0
