"""`python -m hnmix.bench data`: the DataLoader worker pipeline for 1..W workers (or the counts
of `--workers`) in both `--augment_device` modes, decoding each image at every draw and, where
the images qualify (`hnmix.data.decoded`), keeping them decoded in memory; the JPEG decode floor;
and the batched photometric half on a device. Each worker row is also given per core as a
fraction of the decode floor (decoding each image once at full size on one core: the ceiling of a
pipeline that decodes at every draw). The images are generated JPEGs, or `--dataset`'s, with
`--config`'s view size and augmentation. `--lincls` adds the loader of `python -m hnmix.evaluate
--protocol lincls` (one uint8 crop + flip per image, `hnmix.evaluate.lincls.make_lincls_loader`) on
the same images, with its images/s as a fraction of the two-view crop row's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.utils.data
from rich.console import Console
from rich.table import Table

from hnmix.bench.system import _cpu_model, device_description
from hnmix.bench.train import _seconds_per_step, write_jpeg_folder
from hnmix.data.augmentation import augmentation_from
from hnmix.data.decoded import GIB, decode_rgb
from hnmix.data.sources import load_image_dataset, resolve_columns
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import TwoViewDataset, make_train_loader
from hnmix.train.config import load_yaml_options


def lincls_loader_images_per_s(dataset: datasets.Dataset, image_column: str, *, img_size: int, in_memory_bytes: int,
                               counts: list[int], batches: int, batch_size: int) -> dict[int, float]:
    """{workers: images/s (one view each)} of the lincls training loader over `dataset` (every image
    labelled 0), as `python -m hnmix.evaluate --protocol lincls` builds it (`in_memory_bytes`: its
    --images_in_memory_gib), for each worker count of `counts`."""
    from hnmix.evaluate.lincls import AugmentedImages, make_lincls_loader

    labelled = dataset.add_column("bench_label", [0] * len(dataset))
    images = AugmentedImages(labelled, image_column=image_column, label_column="bench_label", img_size=img_size,
                             seed=0, in_memory_bytes=in_memory_bytes)
    return {workers: loader_images_per_s(make_lincls_loader(images, batch_size=batch_size, num_workers=workers, seed=0),
                                         batches) for workers in counts}


def loader_images_per_s(loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Images/s of `loader` over `batches` batches after the first (the workers' start-up)."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            seen += next(iterator)[0].shape[0]
        except StopIteration:  # one more epoch
            iterator = iter(loader)
    return seen / (time.perf_counter() - start)


def decode_images_per_s(dataset: datasets.Dataset, image_column: str, *, images: int = 512, passes: int = 2) -> float:
    """Images/s of decoding up to `images` of the dataset's images at full size on one core, as
    the workers decode them (`hnmix.data.decoded.decode_rgb`): the floor of any per-image pipeline
    that needs the full-size pixels and decodes at every draw."""
    cells = dataset.select(range(min(images, len(dataset))))[image_column]
    start = time.perf_counter()
    for _ in range(passes):
        for index, cell in enumerate(cells):
            decode_rgb(cell, index)
    return passes * len(cells) / (time.perf_counter() - start)


def batched_photometric_images_per_s(*, img_size: int, batch_size: int, device: torch.device, repeats: int) -> float:
    """Images/s (two views each) of the batched photometric half on `device`, as the trainer runs it
    with `--augment_device accelerator`: uint8 [B, 3, S, S] twice -> float32, normalised."""
    from hnmix.data.photometric import StepPhotometric

    generator = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=generator).to(device)
             for _ in range(2)]
    photometric = StepPhotometric(img_size, seed=0, rank=0)
    step = iter(range(1_000_000))
    seconds = _seconds_per_step(lambda: photometric(*views, next(step)), warmup=1, measure=repeats, device=device)
    return batch_size / seconds


def worker_counts(text: str) -> list[int]:
    """`--workers` "1,4,16" -> [1, 4, 16]: positive, increasing, each once."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,4,16, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1, got {text!r}")
    return counts


def _per_core(rows: dict[int, float], decode_floor: float) -> dict[str, dict[int, float]]:
    """{workers: images/s} -> per-core images/s and per core as a fraction of the decode floor."""
    return {"per_core_images_per_s": {w: v / w for w, v in rows.items()},
            "per_core_of_decode_floor": {w: v / w / decode_floor for w, v in rows.items()}}


def _source(args: argparse.Namespace, tmp: str) -> tuple[datasets.Dataset, str, str, dict[str, Any]]:
    """(dataset with undecoded images, image column, what it is, recipe options) of `--dataset`
    (and `--config`), or of `--images` generated JPEGs."""
    recipe = load_yaml_options(args.config) if args.config else {}
    if args.dataset:
        dataset = load_image_dataset(args.dataset, split=args.split)
        image_column, _ = resolve_columns(dataset, recipe.get("image_column", "image"), "none")
        what = f"{args.dataset} split {args.split} ({len(dataset):,} images)"
    else:
        size = tuple(int(v) for v in args.jpeg_size.split("x")) if args.jpeg_size else None
        dataset = load_image_dataset(str(write_jpeg_folder(Path(tmp) / "images", count=args.images, size=size)))
        image_column, what = "image", f"{args.images} {args.jpeg_size or 'Caltech-256-like'} JPEGs"
    dataset = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    return dataset, image_column, what, recipe


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    """The rows of the module docstring, as a table; the JSON payload."""
    device = torch.device(args.device)
    counts = args.workers or list(range(1, args.max_workers + 1))
    photometric_batch = args.photometric_batch_size or args.batch_size
    with tempfile.TemporaryDirectory(prefix="hnmix-bench-") as tmp:
        dataset, image_column, what, recipe = _source(args, tmp)
        img_size = args.img_size or recipe.get("img_size", 224)
        augmentation = augmentation_from(recipe)
        decode_floor = decode_images_per_s(dataset, image_column)
        rows: dict[str, dict[int, float]] = {}
        for storage, budget in (("decoded at every draw", 0), ("kept in memory", args.in_memory_gib * GIB)):
            for mode, photometric in (("accelerator", None), ("cpu", moco_v2_photometric(img_size, augmentation))):
                started = time.perf_counter()
                views = TwoViewDataset(dataset, image_column=image_column, label_column=None, img_size=img_size,
                                       seed=0, photometric=photometric, augmentation=augmentation,
                                       in_memory_bytes=int(budget))
                if storage == "kept in memory" and views.decoded is None:
                    break  # --in_memory_gib 0, or too large or too many to keep (the log said why)
                if budget and mode == "accelerator":
                    decode_all_seconds = time.perf_counter() - started
                rows[f"{mode}, {storage}"] = {workers: loader_images_per_s(make_train_loader(
                    views, batch_size=args.batch_size, num_workers=workers, seed=0), args.batches) for workers in counts}
                if args.lincls and mode == "accelerator":  # the same images kept in memory or not
                    rows[f"lincls, {storage}"] = lincls_loader_images_per_s(
                        dataset, image_column, img_size=img_size, in_memory_bytes=int(budget), counts=counts,
                        batches=args.batches, batch_size=args.batch_size)
    photometric_rate = batched_photometric_images_per_s(img_size=img_size, batch_size=photometric_batch,
                                                        device=device, repeats=args.repeats)
    titles = {"accelerator": "workers: crop, flip -> uint8", "cpu": "workers: + photometric per image",
              "lincls": "lincls: crop, flip -> uint8"}
    table = Table(title=f"Data pipeline: two {img_size}px views per image of {what} (images/s)")
    for column in ("pipeline", "workers", "images/s", "per core", "per core, of the floor"):
        table.add_column(column, justify="right")
    table.add_row("JPEG decode alone, full size (the floor)", "1", f"{decode_floor:.0f}", f"{decode_floor:.0f}", "100%")
    for name, per_workers in rows.items():
        mode, storage = name.split(", ")
        for workers, images_per_s in per_workers.items():
            per_core = images_per_s / workers
            name = f"{titles[mode]}, {storage}"
            if mode == "lincls":
                name += f", {images_per_s / rows[f'accelerator, {storage}'][workers]:.0%} of crop row"
            table.add_row(name, str(workers), f"{images_per_s:.0f}", f"{per_core:.0f}",
                          f"{per_core / decode_floor:.0%}")
    table.add_row(f"batched photometric on {device_description(device)}, batch {photometric_batch}", "-",
                  f"{photometric_rate:.0f}", "-", "-")
    Console(width=max(Console().width, 132)).print(table)  # one line per row, also in a log
    kept = {}
    if "accelerator, kept in memory" in rows:
        kept = {"kept_in_memory": {"images_per_s": rows["accelerator, kept in memory"],
                                   **_per_core(rows["accelerator, kept in memory"], decode_floor),
                                   "photometric_in_workers": {"images_per_s": rows["cpu, kept in memory"]},
                                   "decode_all_seconds": decode_all_seconds}}
    lincls = {}
    if args.lincls:
        lincls = {"lincls_loader": {storage: {"images_per_s": rows[f"lincls, {storage}"],
                                              "of_crop_row": {w: v / rows[f"accelerator, {storage}"][w]
                                                              for w, v in rows[f"lincls, {storage}"].items()}}
                                    for storage in ("decoded at every draw", "kept in memory")
                                    if f"lincls, {storage}" in rows}}
    return {"images_per_s": rows["accelerator, decoded at every draw"],
            **_per_core(rows["accelerator, decoded at every draw"], decode_floor),
            "photometric_in_workers": {"images_per_s": rows["cpu, decoded at every draw"],
                                       **_per_core(rows["cpu, decoded at every draw"], decode_floor)},
            **kept, **lincls, "decode_only_images_per_s": decode_floor,
            "batched_photometric": {"images_per_s": photometric_rate, "device": device_description(device),
                                    "batch_size": photometric_batch},
            "img_size": img_size, "data": what, "augmentation": augmentation.describe(),
            "jpeg_size": None if args.dataset else (args.jpeg_size or "caltech-like"),
            "loader_batch_size": args.batch_size, "torch": torch.__version__, "cpu": _cpu_model()}
