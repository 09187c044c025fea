"""`python -m hnmix.bench data`: the DataLoader worker pipeline for 1..W workers (or the counts
of `--workers`) in both `--augment_device` modes, the JPEG decode floor, and the batched
photometric half on a device. Each worker row is also given per core as a fraction of the decode
floor (decoding each image once at full size on one core: the ceiling of a per-image pipeline).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from hnmix.bench.system import _cpu_model, device_description
from hnmix.bench.train import _seconds_per_step, write_jpeg_folder


def worker_pipeline_images_per_s(directory: Path, *, img_size: int, workers: int, batches: int, batch_size: int,
                                 photometric_in_workers: bool) -> float:
    """Images/s (each giving two views) of `workers` DataLoader workers over `batches` batches
    after the first (which includes the workers' start-up): decode, crop and flip to uint8 views
    (for `--augment_device accelerator`), or with the photometric half per image too (`cpu`)."""
    from hnmix.data.sources import load_image_dataset, resolve_columns
    from hnmix.data.transforms import moco_v2_photometric
    from hnmix.data.two_views import TwoViewDataset, make_train_loader

    dataset = load_image_dataset(str(directory))
    image_column, label_column = resolve_columns(dataset)
    views = TwoViewDataset(dataset, image_column=image_column, label_column=label_column, img_size=img_size, seed=0,
                           photometric=moco_v2_photometric(img_size) if photometric_in_workers else None)
    loader = make_train_loader(views, batch_size=batch_size, num_workers=workers, seed=0)
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


def decode_images_per_s(directory: Path, *, passes: int = 2) -> float:
    """Images/s of decoding the JPEGs at full size on one core, as the workers decode them
    (`hnmix.data.images.decode_jpeg_upright`): the floor of any per-image pipeline that needs the
    full-size pixels."""
    from hnmix.data.images import decode_jpeg_upright

    blobs = [file.read_bytes() for file in sorted(directory.rglob("*.jpg"))]
    start = time.perf_counter()
    for _ in range(passes):
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                decode_jpeg_upright(image, blob)
    return passes * len(blobs) / (time.perf_counter() - start)


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


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    """The worker pipeline's images/s for 1..W workers (or `--workers`) on generated JPEGs, in both
    augmentation modes, with the decoding floor and the batched photometric half on the device."""
    size = tuple(int(v) for v in args.jpeg_size.split("x")) if args.jpeg_size else None
    device = torch.device(args.device)
    counts = args.workers or list(range(1, args.max_workers + 1))
    photometric_batch = args.photometric_batch_size or args.batch_size
    modes = {"accelerator": False, "cpu": True}  # --augment_device -> photometric half in the workers?
    rows: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    with tempfile.TemporaryDirectory(prefix="hnmix-bench-") as tmp:
        directory = write_jpeg_folder(Path(tmp) / "images", count=args.images, size=size)
        decode_floor = decode_images_per_s(directory)
        for mode, photometric_in_workers in modes.items():
            for workers in counts:
                rows[mode][workers] = worker_pipeline_images_per_s(
                    directory, img_size=args.img_size, workers=workers, batches=args.batches,
                    batch_size=args.batch_size, photometric_in_workers=photometric_in_workers)
    photometric = batched_photometric_images_per_s(img_size=args.img_size, batch_size=photometric_batch, device=device,
                                                   repeats=args.repeats)
    table = Table(title=f"Data pipeline: two {args.img_size}px views per image, {args.jpeg_size or 'Caltech-256-like'} "
                        "JPEGs (images/s)")
    for column in ("pipeline", "workers", "images/s", "per core", "per core, of the floor"):
        table.add_column(column, justify="right")
    table.add_row("JPEG decode alone, full size (the floor)", "1", f"{decode_floor:.0f}", f"{decode_floor:.0f}", "100%")
    titles = {"accelerator": "workers: decode, crop, flip -> uint8", "cpu": "workers: + photometric per image"}
    for mode, per_workers in rows.items():
        for workers, images_per_s in per_workers.items():
            per_core = images_per_s / workers
            table.add_row(titles[mode], str(workers), f"{images_per_s:.0f}", f"{per_core:.0f}",
                          f"{per_core / decode_floor:.0%}")
    table.add_row(f"batched photometric on {device_description(device)}, batch {photometric_batch}", "-",
                  f"{photometric:.0f}", "-", "-")
    Console().print(table)
    return {"images_per_s": rows["accelerator"], **_per_core(rows["accelerator"], decode_floor),
            "photometric_in_workers": {"images_per_s": rows["cpu"], **_per_core(rows["cpu"], decode_floor)},
            "decode_only_images_per_s": decode_floor,
            "batched_photometric": {"images_per_s": photometric, "device": device_description(device),
                                    "batch_size": photometric_batch},
            "img_size": args.img_size, "jpeg_size": args.jpeg_size or "caltech-like",
            "loader_batch_size": args.batch_size, "torch": torch.__version__, "cpu": _cpu_model()}
