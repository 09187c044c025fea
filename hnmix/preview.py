"""`python -m hnmix.preview --dataset X`: the two views of the first images of an epoch, exactly as
the trainer makes them, in one picture, to check the augmentation on your data before training.

The images are the first `-n` of the epoch's order (`EpochSampler`, on one process), cropped by
`TwoViewDataset` with the same seed, epoch and index; their photometric half is the training code's:
per image in the workers (`--augment_device cpu`) or batched (`StepPhotometric` on the whole batch
of `--batch_size` at the batch's step). Only that step (epoch x steps per epoch) depends on the
number of processes, and with it the batched draws after the first epoch. The augmentation options
come from the flags, else `--config` (a run's config.yaml or a recipe), else MoCo v2's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import torch
import yaml

from hnmix.data.augmentation import (
    AUGMENTATION_OPTIONS,
    MOCO_V2,
    OPTION_HELP,
    OPTION_METAVAR,
    PROBABILITIES,
    AugmentationSpec,
    augmentation_from,
)
from hnmix.data.geometric import draw_two_crops
from hnmix.data.images import open_image, to_rgb
from hnmix.data.photometric import StepPhotometric
from hnmix.data.sources import load_image_dataset, resolve_columns
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import EpochSampler, TwoViewDataset, sample_rng
from hnmix.errors import ConfigError, exit_code
from hnmix.pictures.views import PreviewRow, draw_views
from hnmix.run_config import load_run_config

DEFAULT_SEED = 69420  # the trainer's
# The options a run's config.yaml can fill in (`--config`), under the trainer's names.
FROM_RUN = ("dataset", "split", "image_column", "label_column", "synthetic_size", "dir_data", "img_size", "seed",
            "batch_size", "augment_device", *AUGMENTATION_OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.preview",
        description="A grid of the first images of an epoch with their query and key views, made exactly as "
        "hnmix.train makes them (same crops, same photometric draws) for that seed and epoch.")
    parser.add_argument("--config", help="a run's config.yaml (DIR_OUT/config.yaml) or a recipe: its data, seed, "
                        "image size, batch size, augment_device and augmentation options become the defaults")
    parser.add_argument("--dataset", help="Hub id, local dataset repo, image folder, save_to_disk directory, or "
                        "synthetic / synthetic-hard (required unless --config names one)")
    parser.add_argument("--split", default="train", help="(default: train)")
    parser.add_argument("--image_column", default="image", help="(default: image)")
    parser.add_argument("--label_column", help="(default: label if present)")
    parser.add_argument("--synthetic_size", type=int, default=512, help="images of a generated dataset (default: 512)")
    parser.add_argument("--dir_data", help="cache directory of `datasets`")
    parser.add_argument("-i", "--img_size", type=int, default=224, help="view size (default: 224)")
    parser.add_argument("-n", type=int, default=8, help="how many images (default: 8)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"the run's seed (default: {DEFAULT_SEED})")
    parser.add_argument("--epoch", type=int, default=0, help="the epoch whose first images are shown (default: 0)")
    parser.add_argument("-bs", "--batch_size", type=int, default=64, help="the run's batch size per process: the "
                        "batched photometric draws depend on it (default: 64)")
    parser.add_argument("--augment_device", choices=("cpu", "accelerator"),
                        help="where the photometric half runs, as in hnmix.train (default: accelerator when a GPU "
                        "is present, else cpu)")
    parser.add_argument("--out", default="views.png", help="the PNG to write (default: views.png)")
    augmentation = parser.add_argument_group("augmentation (hnmix.train's options; default: MoCo v2's)")
    for name in AUGMENTATION_OPTIONS:
        default = getattr(MOCO_V2, name)
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
        augmentation.add_argument(f"--{name}", type=float if name in PROBABILITIES else str,
                                  metavar=OPTION_METAVAR.get(name), help=f"{OPTION_HELP[name]} (default: {shown})")
    return parser


def parse_options(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, with a --config run's values as defaults; bad values are ConfigErrors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**{k: v for k, v in _run_config(args.config).items() if k in FROM_RUN and v is not None})
        args = parser.parse_args(argv)
    if not args.dataset:
        raise ConfigError("option dataset is required: pass --dataset X (or --config DIR_OUT/config.yaml)")
    for name in ("img_size", "n", "batch_size", "synthetic_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"option {name} must be >= 1, got {getattr(args, name)}")
    if args.epoch < 0:
        raise ConfigError(f"option epoch must be >= 0, got {args.epoch}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"option out must name a .png file, got {args.out}")
    if not out.parent.is_dir():
        raise ConfigError(f"option out: folder {out.parent} does not exist; create it or pass another --out")
    if args.augment_device is None:
        args.augment_device = "accelerator" if torch.cuda.is_available() else "cpu"
    args.augmentation = augmentation_from(vars(args))
    return args


def _run_config(path: str) -> dict[str, Any]:
    try:
        config = load_run_config(path)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"option config: cannot read {path} ({type(error).__name__}); pass a run's "
                          "DIR_OUT/config.yaml") from None
    if not isinstance(config, dict):
        raise ConfigError(f"option config: {path} is not a mapping of options; pass a run's DIR_OUT/config.yaml")
    return config


def to_display(view: torch.Tensor, augmentation: AugmentationSpec = MOCO_V2) -> torch.Tensor:
    """A normalised float view [3, S, S] -> uint8 [3, S, S] (the augmentation's mean and std
    undone, rounded)."""
    mean = torch.tensor(augmentation.mean).view(3, 1, 1)
    std = torch.tensor(augmentation.std).view(3, 1, 1)
    return (view.float().cpu() * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def trainer_views(dataset: datasets.Dataset, *, image_column: str, label_column: Optional[str], img_size: int,
                  seed: int, epoch: int, n: int, batch_size: int, on_accelerator: bool,
                  device: Optional[torch.device] = None, augmentation: AugmentationSpec = MOCO_V2) -> list[PreviewRow]:
    """The first `n` images of `epoch` with their crops and views, as the trainer makes them with
    `augmentation` (see the module docstring). Views are uint8 [3, S, S] for display."""
    crops_only = TwoViewDataset(dataset, image_column=image_column, label_column=label_column, img_size=img_size,
                                seed=seed, augmentation=augmentation)
    size = len(crops_only)
    if batch_size > size:
        raise ConfigError(f"option batch_size {batch_size} is more than the {size} images of the dataset; "
                          f"pass --batch_size {size} or less")
    n = min(n, size - size % batch_size)  # the trainer drops the incomplete last batch
    sampler = EpochSampler(size, seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    steps_per_epoch = size // batch_size
    photometric = StepPhotometric(img_size, seed=seed, rank=0, augmentation=augmentation) if on_accelerator else None
    in_workers = None if on_accelerator else TwoViewDataset(
        dataset, image_column=image_column, label_column=label_column, img_size=img_size, seed=seed,
        photometric=moco_v2_photometric(img_size, augmentation), augmentation=augmentation)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = _class_names(dataset, label_column)
    rows = []
    for batch in range(math.ceil(n / batch_size)):
        encoded = order[batch * batch_size : (batch + 1) * batch_size]
        shown = encoded[: n - batch * batch_size]
        # The batched draws depend on the whole batch: all of it is cropped then.
        samples = [crops_only[e] for e in (encoded if on_accelerator else shown)]
        if photometric is not None:
            both = [torch.stack([s[v] for s in samples]).to(device) for v in (0, 1)]
            views_q, views_k = photometric(both[0], both[1], epoch * steps_per_epoch + batch)
        else:
            finished = [in_workers[e] for e in shown]
            views_q, views_k = (torch.stack([f[v] for f in finished]) for v in (0, 1))
        for slot in range(len(shown)):
            crop_q, crop_k, index, label, _ = samples[slot]
            rows.append(_row(crops_only, index, label, names, epoch, crop_q, crop_k,
                             to_display(views_q[slot], augmentation), to_display(views_k[slot], augmentation)))
    return rows


def _row(views: TwoViewDataset, index: int, label: int, names: Optional[list[str]], epoch: int,
         crop_q: torch.Tensor, crop_k: torch.Tensor, view_q: torch.Tensor, view_k: torch.Tensor) -> PreviewRow:
    original = to_rgb(open_image(views.dataset[index][views.image_column]))
    crops, flips = draw_two_crops(*original.size, sample_rng(views.seed, epoch, index), views.augmentation)
    caption = f"image {index}"
    if label >= 0:
        caption += f"\nclass {label}" + (f": {names[label][:16]}" if names and label < len(names) else "")
    return PreviewRow(original, tuple(crops), tuple(flips), crop_q, view_q, crop_k, view_k, caption)


def _class_names(dataset: datasets.Dataset, label_column: Optional[str]) -> Optional[list[str]]:
    feature = dataset.features.get(label_column) if label_column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def preview(args: argparse.Namespace) -> Path:
    dataset = load_image_dataset(args.dataset, split=args.split, cache_dir=args.dir_data, seed=args.seed,
                                 synthetic_size=args.synthetic_size)
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column)
    on_accelerator = args.augment_device == "accelerator"
    rows = trainer_views(dataset, image_column=image_column, label_column=label_column, img_size=args.img_size,
                         seed=args.seed, epoch=args.epoch, n=args.n, batch_size=args.batch_size,
                         on_accelerator=on_accelerator, augmentation=args.augmentation)
    how = (f"batched (--augment_device accelerator, batch {args.batch_size})" if on_accelerator
           else "per image in the workers (--augment_device cpu)")
    title = (f"{args.dataset} split {args.split}: the first {len(rows)} images of epoch {args.epoch}, seed {args.seed}, "
             f"{args.img_size} px\nphotometric half {how}\n{args.augmentation.describe()}")
    return draw_views(rows, args.out, title=title)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return exit_code(lambda: print(f"wrote {preview(parse_options(argv))}"))


if __name__ == "__main__":
    sys.exit(main())
