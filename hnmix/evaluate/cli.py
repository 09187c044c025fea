"""`python -m hnmix.evaluate MODEL --protocol knn|linear|lincls`: evaluation of a frozen encoder from the command line.

The protocols are described in the README and the options' help. Which split plays which role: knn
scores the held-out split (`--knn_split`, else `validation`, else a stratified part of the train
split) against the train split; linear selects lr and weight decay on a split that is never the one
it reports (`load_eval_splits`' with_selection); lincls reports `test`, else the held-out split.
Results on several processes are computed on the main process and broadcast, so every rank returns
the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
from accelerate import Accelerator
from accelerate.utils import set_seed

from hnmix.data.decoded import GIB
from hnmix.data.transforms import EVAL_CROP_PCT
from hnmix.data.workers import workers_per_process
from hnmix.errors import ConfigError, DataError, HnmixError
from hnmix.evaluate.features import (
    EvalImages,
    ExtractedFeatures,
    extract_features,
    make_eval_loader,
)
from hnmix.evaluate.lincls import (
    BACKBONE_KEY,
    SCHEDULES,
    TRAIN_VIEWS,
    AugmentedImages,
    LinclsSettings,
    backbone_sha256,
    check_lincls_dir,
    train_lincls,
)
from hnmix.evaluate.models import LoadedModel, load_backbone, projection_network
from hnmix.evaluate.monitor import KNN_FEATURES, broadcast_from_main
from hnmix.evaluate.probes import (
    LINEAR_LRS,
    LINEAR_WEIGHT_DECAYS,
    knn_accuracy,
    train_linear_probe,
)
from hnmix.evaluate.splits import DEFAULT_SEED, EvalSplits, load_eval_splits

logger = logging.getLogger("hnmix.evaluate")  # not __name__: that is "__main__" under python -m

DEFAULT_DATASET = "ilee0022/Caltech-256"


def resolve_num_workers(args: argparse.Namespace, accelerator: Accelerator) -> tuple[int, str]:
    """(DataLoader workers per process, how that was chosen): --num_workers, else the trainer's
    default, this process's share of the node's usable cores less one (`hnmix.data.workers`)."""
    return workers_per_process(args.num_workers, accelerator.num_processes)


def _split_size(text: str) -> Union[int, float]:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor a count")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.evaluate",
        description="Accuracy of a frozen encoder on a labelled dataset: kNN and a fast linear probe, or the "
        "linear evaluation that MoCo, MoCHi, solo-learn and lightly report (lincls). "
        "Run it as `accelerate launch -m hnmix.evaluate ...` to share the work among processes.",
    )
    parser.add_argument("model", help="a checkpoint directory (DIR_OUT/checkpoints/step_N), an exported encoder "
                        "folder (DIR_OUT/encoder), a Hub id (hf-hub:owner/name or owner/name) or a timm model name")
    parser.add_argument("--protocol", choices=("knn", "linear", "lincls"), default="knn",
                        help="knn and linear are fast probes on precomputed centre-crop features; lincls trains "
                        "a linear classifier on augmented views through the frozen backbone, the number the "
                        "papers report (default: knn)")
    parser.add_argument("--pretrained", action="store_true", help="a timm model name: use timm's pretrained weights")
    data = parser.add_argument_group("DATA (defaults: the training run's config.yaml (a checkpoint's, or the one "
                                     "beside an exported encoder, else its model card), else the values shown)")
    data.add_argument("--dataset", help=f"Hub id, local dataset repo, image folder, save_to_disk directory, or "
                      f"`synthetic` (default: {DEFAULT_DATASET})")
    data.add_argument("--split", help="the train split: kNN bank / linear training data (default: train)")
    data.add_argument("--image_column", help="(default: image)")
    data.add_argument("--label_column", help="(default: `label` if present, else the first ClassLabel column)")
    data.add_argument("--synthetic_size", type=int, help="images per split of --dataset synthetic (default: 512)")
    data.add_argument("--dir_data", help="cache directory of `datasets`")
    data.add_argument("--seed", type=int, help=f"seed of synthetic data, the held-out split, subsets, the linear "
                      f"probe and a random-init timm model (default: {DEFAULT_SEED})")
    data.add_argument("--img_size", "-i", type=int, help="evaluation crop (default: the training run's img_size, "
                      "the encoder's input_size, else 224)")
    data.add_argument("--eval_crop_pct", type=float, help="centre crop of the evaluation images, a fraction of the "
                      "resized short side: resize to img_size / eval_crop_pct, crop img_size (0.875: ImageNet's 256 "
                      "then 224; 1: no crop, images of img_size pass unchanged, as MoCo's CIFAR-10 demo) (default: "
                      "the training run's eval_crop_pct, else the encoder's pretrained_cfg crop_pct, else 0.875)")
    data.add_argument("--eval_split_size", type=_split_size, default=0.1, help="held-out part of the train split "
                      "when there is no validation split: a fraction or a count (default: 0.1)")
    data.add_argument("--eval_max_samples", type=int, help="at most this many images per split, a seeded subset; "
                      "0: all, as in hnmix.train (default: all)")
    data.add_argument("--batch_size", type=int, default=128, help="per process (default: 128)")
    data.add_argument("--num_workers", type=int, help="DataLoader workers per process (default: as hnmix.train, the "
                      "usable cores of this node, a cgroup's CPU quota included, / the processes on it, less 1 for "
                      "the process itself; at least 1)")
    data.add_argument("--images_in_memory_gib", type=float, default=1.0, help="lincls: decode the training images "
                      "once and keep them in shared memory when they take at most this many GiB per process and each "
                      "is under twice img_size on its short side (the same views, as hnmix.train); 0: decode at every "
                      "draw (default: 1)")
    data.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="(default: the accelerate config)")
    proto = parser.add_argument_group("FAST PROBES (--protocol knn, linear: precomputed centre-crop features)")
    proto.add_argument("--knn_k", type=int, help="neighbours (default: the training run's knn_k, else 200)")
    proto.add_argument("--knn_temperature", type=float, help="vote weight exp(sim / T) (default: the training "
                       "run's knn_temperature, else 0.1)")
    proto.add_argument("--knn_split", help="the split the kNN classifies, with the whole --split as bank, e.g. test "
                       "as MoCo's CIFAR-10 demo (default: the training run's knn_split on its dataset, else the "
                       "validation split, else a stratified held-out part of --split, left out of the bank)")
    proto.add_argument("--knn_features", choices=KNN_FEATURES, help="what the kNN compares: backbone (pooled "
                       "features) or projection (the query encoder's L2-normalised head output, as MoCo's CIFAR-10 "
                       "demo; a trainer checkpoint only, since an export has no head) (default: backbone)")
    proto.add_argument("--linear_lrs", type=_float_list, default=LINEAR_LRS,
                       help=f"Adam learning rates to choose from (default: {','.join(map(str, LINEAR_LRS))})")
    proto.add_argument("--linear_weight_decays", type=_float_list, default=LINEAR_WEIGHT_DECAYS,
                       help=f"L2 penalties to choose from (default: {','.join(map(str, LINEAR_WEIGHT_DECAYS))})")
    proto.add_argument("--linear_epochs", type=int, default=10, help="(default: 10)")
    proto.add_argument("--linear_batch_size", type=int, default=256, help="(default: 256)")
    lincls = parser.add_argument_group(
        "LINCLS (--protocol lincls; defaults: facebookresearch/moco main_lincls.py)",
        "A linear classifier on the frozen backbone (eval mode: BatchNorm keeps its running statistics), trained "
        "with SGD on RandomResizedCrop(img_size, scale 0.08-1) + flip views, recomputed every epoch; top-1/top-5 "
        "on the test split (else the held-out split) through the centre crop. Saved after every epoch.")
    lincls.add_argument("--lincls_epochs", type=int, default=100, help="(default: 100)")
    lincls.add_argument("--lincls_lr", type=float, default=30.0, help="SGD learning rate (default: 30.0)")
    lincls.add_argument("--lincls_batch_size", type=int, default=256,
                        help="global batch, all processes together (default: 256)")
    lincls.add_argument("--lincls_weight_decay", type=float, default=0.0, help="(default: 0)")
    lincls.add_argument("--lincls_momentum", type=float, default=0.9, help="(default: 0.9)")
    lincls.add_argument("--lincls_schedule", choices=SCHEDULES, default="step",
                        help="step: lr x0.1 at 60%% and 80%% of the epochs (60 and 80 of 100); cosine: per-epoch "
                        "cosine decay to 0 (default: step)")
    lincls.add_argument("--lincls_dir", help="where the classifier (classifier.safetensors), its training state and "
                        "metrics.jsonl go (default: MODEL/lincls for a checkpoint or encoder directory; required "
                        "for a Hub or timm model)")
    lincls.add_argument("--resume", action="store_true", help="continue the lincls run saved in --lincls_dir "
                        "(after its last complete epoch); a finished run is only evaluated again")
    lincls.add_argument("--lincls_stop_at", type=int, help="stop after this many epochs without changing the "
                        "schedule, to --resume later (default: lincls_epochs)")
    parser.add_argument("--json", help="where to write the results (default: MODEL/evaluation_PROTOCOL.json for a "
                        "checkpoint or encoder directory; LINCLS_DIR/evaluation_lincls.json for lincls on a Hub or timm model; "
                        "else no file)")
    return parser


def lincls_identity(args: argparse.Namespace, settings: LinclsSettings, model: LoadedModel) -> dict[str, Any]:
    """What a resumed lincls run must share with the saved one: its settings, its data and the
    backbone's weights (`backbone_sha256`)."""
    return settings.identity() | {
        "arch": model.arch, "dataset": args.dataset, "split": args.split, "image_column": args.image_column,
        "label_column": args.label_column, "synthetic_size": args.synthetic_size, "img_size": args.img_size,
        "eval_crop_pct": args.eval_crop_pct,
        "eval_split_size": args.eval_split_size, "eval_max_samples": args.eval_max_samples,
        BACKBONE_KEY: backbone_sha256(model.backbone)}


def resolve_options(args: argparse.Namespace, model: LoadedModel, num_processes: int = 1) -> Optional[LinclsSettings]:
    """Fill in `args`: flags win; then the training run's config (`LoadedModel.train_config`,
    `.crop_pct`); then hnmix's defaults. The run's knn_split only applies to the run's dataset. Bad
    values are one-line ConfigErrors. `--eval_max_samples 0` (all) becomes None: one spelling saved.
    Returns the lincls settings of `--protocol lincls`, else None."""
    trained = model.train_config
    defaults = {"dataset": DEFAULT_DATASET, "split": "train", "image_column": "image", "label_column": None,
                "synthetic_size": 512, "dir_data": None, "seed": DEFAULT_SEED, "knn_k": 200, "knn_temperature": 0.1}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, trained.get(name, default))
    args.img_size = args.img_size or model.img_size or 224
    if args.eval_crop_pct is None:
        args.eval_crop_pct = model.crop_pct or EVAL_CROP_PCT
    if args.protocol == "knn":
        on_the_runs_data = args.dataset == trained.get("dataset") and args.split == trained.get("split", "train")
        args.knn_split = args.knn_split or (trained.get("knn_split") if on_the_runs_data else None)
    elif args.knn_split is not None or args.knn_features is not None:
        raise ConfigError("options knn_split and knn_features belong to --protocol knn")
    args.knn_features = args.knn_features or "backbone"
    if not 0 < args.eval_crop_pct <= 1:
        raise ConfigError(f"option eval_crop_pct must be in (0, 1] (1: no crop), got {args.eval_crop_pct}")
    positive = {"img_size": args.img_size, "batch_size": args.batch_size, "knn_k": args.knn_k,
                "linear_epochs": args.linear_epochs, "linear_batch_size": args.linear_batch_size,
                "synthetic_size": args.synthetic_size}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"option {name} must be >= 1, got {value}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"option num_workers must be >= 0, got {args.num_workers}")
    if not args.images_in_memory_gib >= 0:
        raise ConfigError(f"option images_in_memory_gib must be >= 0 (0: decode at every draw), got "
                          f"{args.images_in_memory_gib}")
    if args.eval_max_samples is not None and args.eval_max_samples < 0:
        raise ConfigError(f"option eval_max_samples must be >= 0 (0: all), got {args.eval_max_samples}")
    args.eval_max_samples = args.eval_max_samples or None
    if not args.knn_temperature > 0:
        raise ConfigError(f"option knn_temperature must be > 0, got {args.knn_temperature}")
    if args.protocol == "linear" and not (args.linear_lrs and args.linear_weight_decays):
        raise ConfigError("options linear_lrs and linear_weight_decays need at least one value each")
    if args.protocol != "lincls":
        if args.resume or args.lincls_stop_at is not None or args.lincls_dir:
            raise ConfigError("options resume, lincls_stop_at and lincls_dir belong to --protocol lincls")
        return None
    settings = LinclsSettings(
        epochs=args.lincls_epochs, lr=args.lincls_lr, batch_size=args.lincls_batch_size,
        weight_decay=args.lincls_weight_decay, momentum=args.lincls_momentum, schedule=args.lincls_schedule,
        seed=args.seed, stop_at=args.lincls_stop_at)
    settings.check(num_processes)
    if args.lincls_dir:
        args.lincls_dir = Path(args.lincls_dir).expanduser()
    elif model.kind in ("checkpoint", "encoder"):
        args.lincls_dir = Path(model.source) / "lincls"
    else:
        raise ConfigError(f"--protocol lincls on {model.source} needs --lincls_dir DIR: where the classifier "
                          "and its training state are saved")
    return settings


def default_json_path(args: argparse.Namespace, model: LoadedModel) -> Optional[Path]:
    if args.json:
        return Path(args.json)
    if model.kind in ("checkpoint", "encoder"):
        return Path(model.source) / f"evaluation_{args.protocol}.json"
    if args.lincls_dir is not None:
        return args.lincls_dir / "evaluation_lincls.json"
    return None


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """The whole CLI run; returns the report (the same on every rank) after printing and writing it."""
    accelerator = _make_accelerator(args.mixed_precision)
    _configure_logging(accelerator)
    set_seed(args.seed if args.seed is not None else DEFAULT_SEED)  # a random-init baseline: the same weights on every rank
    with accelerator.main_process_first():
        model = load_backbone(args.model, pretrained=args.pretrained)
    lincls = resolve_options(args, model, accelerator.num_processes)
    json_path = default_json_path(args, model)
    if json_path is not None:
        _check_writable(json_path)  # on every rank, before the work: all ranks stop together
    resume_from, identity = None, None
    if lincls is not None:
        identity = lincls_identity(args, lincls, model)
        resume_from = check_lincls_dir(args.lincls_dir, identity, resume=args.resume)
    network = projection_network(model) if args.knn_features == "projection" else model.backbone
    num_workers, workers_from = resolve_num_workers(args, accelerator)
    logger.info(f"DataLoader workers per process: {num_workers} ({workers_from})")
    splits = _load_splits(args, accelerator)
    backbone = network.to(accelerator.device)
    mean, std = model.normalization()  # the statistics the encoder was trained with
    settings: dict[str, Any] = {"img_size": args.img_size, "eval_crop_pct": args.eval_crop_pct,
                                "batch_size": args.batch_size, "num_workers": num_workers,
                                "eval_split_size": args.eval_split_size, "eval_max_samples": args.eval_max_samples,
                                "seed": args.seed, "mixed_precision": accelerator.mixed_precision,
                                "num_processes": accelerator.num_processes, "normalize_mean": list(mean),
                                "normalize_std": list(std)}
    roles = {"knn": ("train", "held_out"), "linear": ("train", "selection", "test"), "lincls": ("train", "test")}
    if lincls is not None:
        started = time.perf_counter()
        columns = dict(image_column=splits.image_column, label_column=splits.label_column, img_size=args.img_size,
                       mean=mean, std=std)
        train_images = AugmentedImages(splits.train, **columns, seed=args.seed,
                                       in_memory_bytes=int(args.images_in_memory_gib * GIB))
        metrics = train_lincls(
            backbone, train_images, EvalImages(splits.reported, **columns, crop_pct=args.eval_crop_pct, as_uint8=True),
            accelerator, num_classes=splits.num_classes,
            settings=lincls, lincls_dir=args.lincls_dir, resume_from=resume_from,
            identity=identity, num_workers=num_workers, eval_batch_size=args.batch_size,
            metadata={"arch": model.arch, "model": model.source, "num_classes": str(splits.num_classes),
                      "img_size": str(args.img_size)})
        metrics["seconds_protocol"] = time.perf_counter() - started
        settings |= {f"lincls_{k}": v for k, v in lincls.identity().items() if k != "seed"}
        settings |= {"lincls_milestones": list(lincls.milestones()) if lincls.schedule == "step"
                     else None, "lincls_stop_at": lincls.stop_at, "lincls_resumed": resume_from is not None,
                     "lincls_train_views": TRAIN_VIEWS, "lincls_images_in_memory": train_images.decoded is not None}
        return _finish(accelerator, args, model, splits, roles["lincls"], metrics, settings, json_path)

    def features_of(dataset: datasets.Dataset) -> ExtractedFeatures:
        images = EvalImages(dataset, image_column=splits.image_column, label_column=splits.label_column,
                            img_size=args.img_size, mean=mean, std=std, crop_pct=args.eval_crop_pct, as_uint8=True)
        loader = accelerator.prepare(make_eval_loader(images, batch_size=args.batch_size, num_workers=num_workers))
        return extract_features(backbone, loader, accelerator, normalization=images.normalization)

    started = time.perf_counter()
    extracted = [features_of(splits.reported if role == "test" else getattr(splits, role))
                 for role in roles[args.protocol]]
    extraction_s = time.perf_counter() - started
    features = [tensor for split in extracted for tensor in split]  # [N, D] features, [N] labels of each role
    unreadable = sum(split.skipped for split in extracted)
    if unreadable:
        logger.warning(f"{unreadable} image(s) could not be read and were left out (the first are named above)")
    metrics = None
    if accelerator.is_main_process:
        started = time.perf_counter()
        if args.protocol == "knn":
            settings |= {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature,
                         "knn_split": splits.held_out_name, "knn_features": args.knn_features}
            metrics = knn_accuracy(*features, num_classes=splits.num_classes, k=args.knn_k,
                                   temperature=args.knn_temperature)
        else:
            settings |= {"linear_lrs": list(args.linear_lrs), "linear_weight_decays": list(args.linear_weight_decays),
                         "linear_epochs": args.linear_epochs, "linear_batch_size": args.linear_batch_size,
                         "linear_features": "standardised with the fitting split's mean and std",
                         "linear_refit_on_train_and_selection": True}
            metrics = train_linear_probe(*features, num_classes=splits.num_classes, lrs=args.linear_lrs,
                                         weight_decays=args.linear_weight_decays, epochs=args.linear_epochs,
                                         batch_size=args.linear_batch_size, seed=args.seed,
                                         refit_on_train_and_val=True)
        metrics |= {"seconds_features": extraction_s, "seconds_protocol": time.perf_counter() - started,
                    "eval_bad_samples": unreadable}
    metrics = broadcast_from_main(metrics, accelerator)
    return _finish(accelerator, args, model, splits, roles[args.protocol], metrics, settings, json_path)


def _load_splits(args: argparse.Namespace, accelerator: Accelerator) -> EvalSplits:
    """The protocol's splits (`load_eval_splits`); the kNN's queries are --knn_split when set."""
    try:
        with accelerator.main_process_first():
            return load_eval_splits(
                args.dataset, split=args.split, image_column=args.image_column,
                label_column=args.label_column, eval_split_size=args.eval_split_size,
                max_samples=args.eval_max_samples, seed=args.seed, cache_dir=args.dir_data,
                synthetic_size=args.synthetic_size, with_test=args.protocol == "lincls",
                with_selection=args.protocol == "linear", held_out_split=args.knn_split,
            )
    except DataError as error:
        if args.knn_split is not None and str(error).startswith(f"split {args.knn_split!r} does not exist"):
            raise ConfigError(f"option knn_split: {error}") from None
        raise


def _finish(accelerator: Accelerator, args: argparse.Namespace, model: LoadedModel, splits: EvalSplits,
            roles: Sequence[str], metrics: dict[str, Any], settings: dict[str, Any],
            json_path: Optional[Path]) -> dict[str, Any]:
    """The report (`metrics` + what was evaluated, on which splits, how), written and printed by the main process."""
    report = {**metrics, "protocol": args.protocol, "model": model.describe(),
              "dataset": {"source": args.dataset, "split": args.split, **splits.describe(roles)},
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
    """INFO lines on the main process's stderr (rich), errors only elsewhere. Like the trainer, it
    replaces the root logger's handlers, so that `python -m hnmix.bench learn` prints each line once."""
    from rich.console import Console
    from rich.logging import RichHandler

    if accelerator.is_main_process:
        console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        handler = RichHandler(console=console, show_path=False)
        logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]", handlers=[handler], force=True)
    else:
        logging.basicConfig(level=logging.ERROR, force=True)
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
    if report["model"].get("run_config"):
        table.add_row("run config", report["model"]["run_config"])
    table.add_row("dataset", f"{dataset['source']}, {dataset['num_classes']} classes")
    for role in dataset["sizes"]:
        table.add_row(role, f"{dataset['sizes'][role]} images: {dataset[role]}")
    for name, value in report.items():
        if name.startswith(("knn_", "linear_", "lincls_")) and isinstance(value, (int, float)):
            table.add_row(name, f"{value:.2f}" if name.endswith(("top1", "top5")) else f"{value:g}")
    if report.get("lincls_dir"):
        table.add_row("lincls_dir", report["lincls_dir"])
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
