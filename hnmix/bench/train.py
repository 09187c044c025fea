"""`python -m hnmix.bench train`: the trainer against its ceiling.

Rows: the bare encoder loop (query forward + backward, key forward: the ceiling of any MoCo
trainer), in-memory plain MoCo and MoCHi steps as the trainer runs them (eager), and the full
trainer with its data pipeline (from its metrics.jsonl). Options it does not know go to
`hnmix.train`. On a GPU each row also reports its peak memory: `torch.cuda.max_memory_allocated`
with the peak statistics reset before the row (after garbage collection and `empty_cache`, so what
earlier rows left behind counts only while still referenced).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from hnmix.bench.overhead import bare_step, trainer_step
from hnmix.bench.system import MIB, _synchronize, device_description

# The seed implementation's documented command line (issue: trainer), minus its data paths.
SEED_TRAIN_OPTIONS = ["-i", "64", "-bs", "32", "-a", "resnet18", "-km", "4096", "-nh", "32", "-s1h", "16",
                      "-s2h", "16", "-st1h", "1", "-st2h", "1"]


def write_jpeg_folder(directory: Path, *, count: int, seed: int = 0, classes: int = 8,
                      size: Optional[tuple[int, int]] = None) -> Path:
    """`count` JPEGs in `classes` class folders: of Caltech-256-like sizes (about 300 x 250,
    varying) or all of `size` (width, height).

    Their content is smooth random colour fields: decoding cost is what matters here.
    """
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(200, 500)), int(rng.integers(160, 400))
        if size is not None:
            width, height = size
        coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        folder = directory / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return directory


def steady_images_per_s(records: list[dict[str, Any]]) -> float:
    """Throughput over records of one step each: steps / sum of the seconds each step took."""
    return len(records) / sum(1.0 / r["images_per_s"] for r in records)


def _seconds_per_step(step: Callable[[], None], *, warmup: int, measure: int, device: torch.device) -> float:
    """Median wall time of `step` over `measure` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(measure):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_memory_images_per_s(config, *, device: torch.device, bare: bool, warmup: int, measure: int) -> float:
    """images/s on fixed in-memory views, no data pipeline, one process: the bare loop
    (`hnmix.bench.overhead.bare_step`, the ceiling of any MoCo trainer) or the trainer's step
    (`trainer_step`: `hnmix.train.step.TrainStep` as the loop runs it, eager)."""
    if bare:
        step = bare_step(config, device)
    else:
        step, device = trainer_step(config.with_options(compile=False, compile_mode="default"),
                                    calls=warmup + measure)
    return config.optimization.batch_size / _seconds_per_step(step, warmup=warmup, measure=measure, device=device)


def with_peak_gpu_memory(device: torch.device, measure: Callable[[], float]) -> tuple[float, Optional[int]]:
    """(what `measure` returns, the peak bytes allocated on `device` while it ran); None on a CPU."""
    if device.type != "cuda":
        return measure(), None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    value = measure()
    return value, torch.cuda.max_memory_allocated(device)


def full_trainer_images_per_s(config, *, images: int, warmup: int, measure: int) -> float:
    """images/s of `hnmix.train.loop.train` itself (data pipeline included), from its metrics.jsonl."""
    from hnmix.train.loop import train

    with tempfile.TemporaryDirectory(prefix="hnmix-bench-") as tmp:
        if config.data.dataset == GENERATED:
            Console().log(f"writing {images} generated JPEGs")
            config = config.with_options(dataset=str(write_jpeg_folder(Path(tmp) / "images", count=images)))
        steps = warmup + measure
        config = config.with_options(dir_out=str(Path(tmp) / "out"), steps=steps, steps_print=1, steps_save=steps,
                         keep_checkpoints=1, stop_at=None, resume=None)
        train(config)
        records = [json.loads(line) for line in (Path(tmp) / "out/metrics.jsonl").read_text().splitlines()]
    return steady_images_per_s(records[warmup:])


GENERATED = "generated-jpegs"  # --dataset default of `bench train`: JPEGs written for the run
BARE_LOOP = "bare loop (encoder fwd+bwd, key fwd; in-memory)"  # the ceiling of every row
FULL_TRAINER = "full trainer (data pipeline)"


def run_train(args: argparse.Namespace, trainer_argv: Sequence[str]) -> dict[str, Any]:
    """The trainer against its ceiling: bare encoder loop, in-memory MoCo and MoCHi, full trainer."""
    from hnmix.train.config import parse_config

    argv = [*SEED_TRAIN_OPTIONS, "--num_workers", str(os.cpu_count() or 1), "--eval_every", "0",
            "--dataset", GENERATED, *trainer_argv]
    config = parse_config(argv)
    device = torch.device("cpu" if config.run.device == "cpu" or not torch.cuda.is_available() else "cuda")
    plain = config.with_options(s1_hard=0, s2_hard=0)
    timing = dict(warmup=args.warmup_steps, measure=args.measure_steps)
    measures = {
        BARE_LOOP: lambda: in_memory_images_per_s(config, device=device, bare=True, **timing),
        "plain MoCo step, in-memory (s1 = s2 = 0)": lambda: in_memory_images_per_s(plain, device=device, bare=False,
                                                                                  **timing),
        "MoCHi step, in-memory": lambda: in_memory_images_per_s(config, device=device, bare=False, **timing),
        FULL_TRAINER: lambda: full_trainer_images_per_s(config, images=args.images, **timing),
    }
    console = Console()
    rows, peaks = {}, {}
    for name, measure in measures.items():
        rows[name], peaks[name] = with_peak_gpu_memory(device, measure)
        console.log(f"{name}: {rows[name]:.1f} images/s" + ("" if peaks[name] is None else
                                                            f", peak GPU memory {peaks[name] / MIB:.0f} MiB"))
    ceiling = rows[BARE_LOOP]
    method = config.method
    table = Table(title=f"hnmix.train, {config.model.arch} {config.data.img_size}px, batch {config.optimization.batch_size}, "
                        f"K={method.k_moco}, n_hard={method.n_hard}, s1={method.s1_hard}, s2={method.s2_hard}, "
                        f"{config.run.mixed_precision or 'accelerate default'} precision, "
                        f"{'compiled' if config.run.compile else 'eager'}, {device_description(device)}")
    table.add_column("run")
    table.add_column("images/s", justify="right")
    table.add_column("of the bare loop", justify="right")
    table.add_column("peak GPU memory (MiB)", justify="right")
    for name, images_per_s in rows.items():
        peak = "n/a" if peaks[name] is None else f"{peaks[name] / MIB:.0f}"
        table.add_row(name, f"{images_per_s:.1f}", f"{images_per_s / ceiling:.0%}", peak)
    console.print(table)
    mochi_cost = rows["plain MoCo step, in-memory (s1 = s2 = 0)"] / rows["MoCHi step, in-memory"] - 1
    console.print(f"MoCHi costs {mochi_cost:+.1%} over plain MoCo (in-memory steps)")
    return {"images_per_s": rows, "ratio_to_bare_loop": {k: v / ceiling for k, v in rows.items()},
            "peak_gpu_memory_bytes": peaks,
            "peak_gpu_memory_mib": {k: None if v is None else v / MIB for k, v in peaks.items()},
            "mochi_cost_over_moco": mochi_cost, "trainer_images_per_s": rows[FULL_TRAINER],
            "warmup_steps": args.warmup_steps, "measured_steps": args.measure_steps, "config": config.options(),
            "torch": torch.__version__, "device": device_description(device)}
