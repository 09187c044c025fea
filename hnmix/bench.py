"""Benchmarks of hnmix, run as a module.

Usage:

    python -m hnmix.bench train [--warmup_steps 3] [--measure_steps 10] [--images 512] [hnmix.train options]
                                 (bare encoder loop, in-memory MoCo and MoCHi steps, the full trainer)
    python -m hnmix.bench data [--max_workers W] [--img_size 224] [--jpeg_size 768x512] [--images 256]
                               [--device cuda|cpu]
                                 (worker pipeline for 1..W workers, both --augment_device modes;
                                  the batched photometric half on the device)
    python -m hnmix.bench mixing [--batch 256] [--queue 65536] [--dim 128] [--n_hard 1024]
                                 [--s1 1024] [--s2 512] [--temperature 0.2]
                                 [--repeats 5] [--warmup 1] [--device cuda|cpu]
                                 [--dtype float32|bfloat16] [--json PATH]

``mixing`` times one forward + backward of the contrastive loss (logits, cross entropy with
target 0, backward to ``q``) on random L2-normalised inputs, for three variants:

  moco          plain MoCo: `mochi_logits` with n_hard = s1 = s2 = 0;
  hnmix         MoCHi as hnmix computes it: `mochi_logits` with n_hard, s1, s2;
  materialised  MoCHi the naive way (`materialised_mochi_logits` below): the hard negatives are
                gathered into [B, s, d] tensors, mixed, normalised and multiplied with q.

Inputs: q [B, d] (``--dtype``, requires grad) and k [B, d] in ``--dtype``, as the encoders give
them under autocast; the queue [K, d] in float32, as `hnmix.moco.KeyQueue` stores it; dataset ids
for the batch and the queue, with the occasional duplicate, so the duplicate mask is exercised.

Time: the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, with
``torch.cuda.synchronize`` around each call on a GPU. The variants take turns call by call, so
a busy spell of the machine does not land on one variant only.

Peak extra memory, one forward + backward per variant after the timing:
  CUDA  ``torch.cuda.max_memory_allocated`` after the call minus ``memory_allocated`` before it,
        with the peak statistics reset just before the call (the caching allocator's view).
  CPU   in a fresh interpreter per variant (the hidden ``_mixing_peak`` subcommand): build the
        inputs, run the variant once at a tiny size so lazily loaded kernels and thread pools
        are not counted, reset the kernel's resident-set high-water mark (``5`` into
        ``/proc/self/clear_refs``), read the resident set from ``/proc/self/statm``, run the
        call, and report the high-water mark (``VmHWM`` in ``/proc/self/status``) minus that.
        ``VmHWM`` rather than ``getrusage().ru_maxrss``: a child started by exec inherits the
        parent's RSS into ru_maxrss, which would swamp the measurement. Where the mark cannot
        be reset (or VmHWM is missing and ru_maxrss stands in), the number is an upper bound and
        the JSON says so (``peak_reset``: false; ``(<=)`` in the table). Pages allocated but never
        touched do not count; that is the memory the call really made resident.

The last line checks the target of hnmix: the time mixing adds over plain MoCo should be at most
half of what the materialising implementation adds. ``--json PATH`` writes every number, the
configuration, the device and the torch version.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

from hnmix.mixing import draw_mixing, mochi_logits, validate_mixing_arguments

VARIANTS = ("moco", "hnmix", "materialised")
VARIANT_LABELS = {
    "moco": "plain MoCo",
    "hnmix": "MoCHi, hnmix",
    "materialised": "MoCHi, materialising",
}
TARGET_RATIO = 0.5
SEED = 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIB = 1 << 20


# ----------------------------------------------------------------------------- reference


def materialised_mochi_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int,
    s1: int,
    s2: int,
    ids: Optional[torch.Tensor] = None,
    queue_ids: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """`hnmix.mixing.mochi_logits` computed the naive way, in float32.

    Every synthetic negative is built as a vector: the mixed hard negatives are gathered into
    [B, s, d] tensors (`index_select`), mixed, L2-normalised and multiplied with q (bmm). The hard set is the same
    top-n_hard selection and the random draws are `draw_mixing`'s, taken in the same order from
    `generator`, so with equally seeded generators both functions return the same logits and
    gradients. The mixed vectors are constants (the queue and, for type 2, q are detached).
    """
    validate_mixing_arguments(
        q, k, queue, temperature=temperature, n_hard=n_hard, s1=s1, s2=s2, ids=ids, queue_ids=queue_ids
    )
    q, k, queue = q.float(), k.float().detach(), queue.float().detach()
    B, K = q.shape[0], queue.shape[0]
    pos = (q * k).sum(-1, keepdim=True)  # [B, 1]
    neg = q @ queue.T  # [B, K]
    n_unmasked = torch.full((B,), K, dtype=torch.long, device=q.device)
    if ids is not None:
        duplicate = ids.unsqueeze(1) == queue_ids.unsqueeze(0)  # [B, K]
        neg = neg.masked_fill(duplicate, float("-inf"))
        n_unmasked = n_unmasked - duplicate.sum(1)
    columns = [pos, neg]
    if s1 or s2:
        hard_indices = neg.detach().topk(n_hard, dim=1).indices  # [B, n_hard], best first
        n_valid = n_unmasked.clamp_max(n_hard)
        draws = draw_mixing(n_valid, s1, s2, generator)
    if s1:
        n_i = _gather_rows(queue, hard_indices.gather(1, draws.pair_i))  # [B, s1, d]
        n_j = _gather_rows(queue, hard_indices.gather(1, draws.pair_j))
        a = draws.alpha.unsqueeze(2)
        type1 = _dot_with_mixed(q, a * n_i + (1 - a) * n_j)
        columns.append(type1.masked_fill((n_valid < 2).unsqueeze(1), float("-inf")))
    if s2:
        n_i = _gather_rows(queue, hard_indices.gather(1, draws.single))  # [B, s2, d]
        b = draws.beta.unsqueeze(2)
        type2 = _dot_with_mixed(q, b * q.detach().unsqueeze(1) + (1 - b) * n_i)
        columns.append(type2.masked_fill((n_valid < 1).unsqueeze(1), float("-inf")))
    return torch.cat(columns, dim=1) / temperature


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a [K, d] table and an [B, s] index, as [B, s, d].

    `index_select` on the flattened index: the same result as ``table[index]`` and, on CPU,
    about 2.5x faster at the benchmark's sizes, so the reference is not slowed by its gather.
    """
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


def _dot_with_mixed(q: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """[B, s] dot products of q [B, d] with the L2-normalised rows of mixed [B, s, d]."""
    return torch.bmm(F.normalize(mixed, dim=2), q.unsqueeze(2)).squeeze(2)


# ----------------------------------------------------------------------------- mixing: inputs


@dataclass(frozen=True)
class MixingConfig:
    batch: int
    queue: int
    dim: int
    n_hard: int
    s1: int
    s2: int
    temperature: float
    repeats: int
    warmup: int
    device: str
    dtype: str


@dataclass
class MixingInputs:
    q: torch.Tensor  # [B, d] config dtype, requires grad
    k: torch.Tensor  # [B, d] config dtype
    queue: torch.Tensor  # [K, d] float32
    ids: torch.Tensor  # [B] int64
    queue_ids: torch.Tensor  # [K] int64


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows in place (no transient copy, which would distort the CPU peak)."""
    return x.div_(x.norm(dim=1, keepdim=True))


def make_inputs(cfg: MixingConfig) -> MixingInputs:
    """Random unit vectors and dataset ids drawn from a dataset 4x the queue size."""
    g = torch.Generator().manual_seed(SEED)
    B, K, d = cfg.batch, cfg.queue, cfg.dim
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    dataset_size = 4 * max(K, B)
    q = _unit_rows(torch.randn(B, d, generator=g)).to(device, dtype).requires_grad_()
    k = _unit_rows(torch.randn(B, d, generator=g)).to(device, dtype)
    queue = _unit_rows(torch.randn(K, d, generator=g)).to(device)
    ids = torch.randperm(dataset_size, generator=g)[:B].to(device)
    queue_ids = torch.randint(dataset_size, (K,), generator=g).to(device)
    return MixingInputs(q, k, queue, ids, queue_ids)


def variant_logits(
    variant: str, x: MixingInputs, cfg: MixingConfig, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """The logits of one variant; plain MoCo mixes nothing."""
    if variant == "moco":
        sizes = dict(n_hard=0, s1=0, s2=0)
    else:
        sizes = dict(n_hard=cfg.n_hard, s1=cfg.s1, s2=cfg.s2)
    fn = materialised_mochi_logits if variant == "materialised" else mochi_logits
    return fn(
        x.q, x.k, x.queue, temperature=cfg.temperature, ids=x.ids, queue_ids=x.queue_ids,
        generator=generator, **sizes,
    )


def forward_backward(
    variant: str, x: MixingInputs, cfg: MixingConfig, generator: Optional[torch.Generator]
) -> None:
    """Logits, cross entropy with target 0, backward to q."""
    x.q.grad = None
    logits = variant_logits(variant, x, cfg, generator)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    F.cross_entropy(logits, target).backward()


def _new_generator(cfg: MixingConfig) -> torch.Generator:
    return torch.Generator(device=cfg.device).manual_seed(SEED)


# ----------------------------------------------------------------------------- mixing: time


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants: Sequence[str], x: MixingInputs, cfg: MixingConfig) -> dict[str, list[float]]:
    """Milliseconds of each timed forward + backward per variant, after the warmup calls.

    The variants take turns (one call each per repeat), so a slow spell of the machine falls on
    all of them rather than on whichever ran at the time.
    """
    device = torch.device(cfg.device)
    generators = {v: _new_generator(cfg) for v in variants}
    for v in variants:
        for _ in range(cfg.warmup):
            forward_backward(v, x, cfg, generators[v])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(cfg.repeats):
        for v in variants:
            _synchronize(device)
            start = time.perf_counter()
            forward_backward(v, x, cfg, generators[v])
            _synchronize(device)
            times[v].append(1e3 * (time.perf_counter() - start))
    return times


# ----------------------------------------------------------------------------- mixing: memory


@dataclass
class PeakMemory:
    extra_bytes: int
    method: str
    peak_reset: bool  # False: the number is an upper bound (an earlier high-water mark may count)


def cuda_peak(variant: str, x: MixingInputs, cfg: MixingConfig) -> PeakMemory:
    """Peak allocated bytes during one call above what was allocated before it."""
    device = torch.device(cfg.device)
    x.q.grad = None
    gc.collect()
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward_backward(variant, x, cfg, _new_generator(cfg))
    _synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - before
    return PeakMemory(extra, "cuda max_memory_allocated - memory_allocated", True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's resident-set high-water mark: VmHWM, else ru_maxrss.

    VmHWM is the address space's own mark, which `_reset_peak_rss` resets. ru_maxrss is also
    at least the parent's RSS when the process was started by exec (Linux carries it over).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _peak_rss_bytes() <= _rss_bytes() + MIB


def cpu_peak_in_this_process(variant: str, cfg: MixingConfig) -> PeakMemory:
    """Peak RSS increase of one call; meant for a fresh interpreter (`_mixing_peak`)."""
    x = make_inputs(cfg)
    tiny = replace(cfg, batch=4, queue=8, dim=4, n_hard=min(cfg.n_hard, 4), s1=min(cfg.s1, 2), s2=min(cfg.s2, 2))
    forward_backward(variant, make_inputs(tiny), tiny, _new_generator(tiny))
    gc.collect()
    reset = _reset_peak_rss()
    before = _rss_bytes()
    forward_backward(variant, x, cfg, _new_generator(cfg))
    extra = max(0, _peak_rss_bytes() - before)
    return PeakMemory(extra, "fresh process: VmHWM (peak RSS) after - /proc/self/statm RSS before", reset)


def cpu_peak(variant: str, cfg: MixingConfig) -> PeakMemory:
    """Run `cpu_peak_in_this_process` in a fresh interpreter and read its JSON line."""
    command = [sys.executable, "-m", "hnmix.bench", "_mixing_peak", "--variant", variant, *mixing_argv(cfg)]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return PeakMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def measure_peak(variant: str, x: MixingInputs, cfg: MixingConfig) -> Optional[PeakMemory]:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        return cuda_peak(variant, x, cfg)
    if device.type == "cpu" and Path("/proc/self/statm").exists():
        return cpu_peak(variant, cfg)
    return None


# ----------------------------------------------------------------------------- mixing: report


@dataclass
class VariantResult:
    ms_median: float
    ms_all: list[float]
    ms_added: float  # over plain MoCo
    peak: Optional[PeakMemory]


def _ratio(mixing_added: float, materialised_added: float) -> Optional[float]:
    return mixing_added / materialised_added if materialised_added > 0 else None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_mixing_report(console: Console, cfg: MixingConfig, results: dict[str, VariantResult]) -> None:
    table = Table(title=f"fwd+bwd, B={cfg.batch} K={cfg.queue} d={cfg.dim} n_hard={cfg.n_hard} "
                        f"s1={cfg.s1} s2={cfg.s2} {cfg.dtype} on {cfg.device}")
    for column in ("variant", "ms per fwd+bwd", "added over plain MoCo (ms)", "peak extra (MiB)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, r in results.items():
        peak = "n/a" if r.peak is None else f"{r.peak.extra_bytes / MIB:.1f}" + ("" if r.peak.peak_reset else " (<=)")
        table.add_row(VARIANT_LABELS[name], f"{r.ms_median:.2f}", f"{r.ms_added:+.2f}", peak)
    console.print(table)
    x, y = results["hnmix"].ms_added, results["materialised"].ms_added
    ratio = _ratio(x, y)
    ratio_text = "n/a (the materialising oracle adds nothing)" if ratio is None else f"{ratio:.3f}"
    console.print(
        f"mixing adds {x:.2f} ms over plain MoCo, the materialising oracle adds {y:.2f} ms: "
        f"ratio {ratio_text} (target <= {TARGET_RATIO})"
    )


def mixing_json(cfg: MixingConfig, results: dict[str, VariantResult]) -> dict[str, Any]:
    device = torch.device(cfg.device)
    x, y = results["hnmix"].ms_added, results["materialised"].ms_added
    ratio = _ratio(x, y)
    return {
        "command": "mixing",
        "config": asdict(cfg),
        "device": device_description(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": {
            name: {
                "ms_median": r.ms_median,
                "ms_all": r.ms_all,
                "ms_added_over_moco": r.ms_added,
                "peak_extra_bytes": None if r.peak is None else r.peak.extra_bytes,
                "peak_extra_mib": None if r.peak is None else r.peak.extra_bytes / MIB,
                "peak_method": None if r.peak is None else r.peak.method,
                "peak_reset": None if r.peak is None else r.peak.peak_reset,
            }
            for name, r in results.items()
        },
        "mixing_added_ms": x,
        "materialised_added_ms": y,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": None if ratio is None else ratio <= TARGET_RATIO,
    }


# ----------------------------------------------------------------------------- mixing: commands


def mixing_config(args: argparse.Namespace) -> MixingConfig:
    return MixingConfig(
        batch=args.batch, queue=args.queue, dim=args.dim, n_hard=args.n_hard, s1=args.s1, s2=args.s2,
        temperature=args.temperature, repeats=args.repeats, warmup=args.warmup,
        device=args.device, dtype=args.dtype,
    )


def mixing_argv(cfg: MixingConfig) -> list[str]:
    """The command-line options that rebuild `cfg` (for the `_mixing_peak` subprocess)."""
    return [f"--{name}={value}" for name, value in asdict(cfg).items()]


def run_mixing(args: argparse.Namespace) -> dict[str, Any]:
    cfg = mixing_config(args)
    console = Console()
    x = make_inputs(cfg)
    console.log(f"timing {', '.join(VARIANTS)}: {cfg.warmup} warmup + {cfg.repeats} timed calls each, interleaved")
    times = time_variants(VARIANTS, x, cfg)
    peaks = {}
    for variant in VARIANTS:
        console.log(f"peak memory of {VARIANT_LABELS[variant]}")
        peaks[variant] = measure_peak(variant, x, cfg)
    moco_ms = statistics.median(times["moco"])
    results = {
        v: VariantResult(statistics.median(times[v]), times[v], statistics.median(times[v]) - moco_ms, peaks[v])
        for v in VARIANTS
    }
    print_mixing_report(console, cfg, results)
    return mixing_json(cfg, results)


def run_mixing_peak(args: argparse.Namespace) -> None:
    """Hidden: one variant's peak memory in this (fresh) process, printed as a JSON line."""
    peak = cpu_peak_in_this_process(args.variant, mixing_config(args))
    print(json.dumps(asdict(peak)))


# ----------------------------------------------------------------------------- train

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
    """images/s on fixed in-memory views, no data pipeline, one process.

    bare=True: only the query encoder's forward + backward and the key encoder's forward (the
    ceiling of any MoCo trainer). bare=False: the trainer's step as `hnmix.train` runs it: the
    batched photometric half when it runs on the accelerator (`--augment_device`), MoCo forward
    with the queue and mixing as configured, loss, backward, clipping, the guarded fused AdamW,
    momentum update and schedule.
    """
    from hnmix.optim import NonFiniteGuard, make_optimizer  # bench may import the trainer; not the reverse
    from hnmix.photometric import StepPhotometric
    from hnmix.train import augment_on_accelerator, build_model, seed_lr_schedule

    moco = build_model(config).to(device)
    optimizer = make_optimizer(moco.encoder_q, lr=config.lr_base, weight_decay=0.01, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, seed_lr_schedule(config))
    guard = NonFiniteGuard(optimizer, config.max_nonfinite_steps, device=device)
    generator = torch.Generator().manual_seed(0)
    on_accelerator = augment_on_accelerator(config, device)
    photometric = StepPhotometric(config.img_size, seed=0, rank=0) if on_accelerator and not bare else None
    shape = (config.batch_size, 3, config.img_size, config.img_size)
    if photometric:
        views = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device) for _ in range(2)]
    else:
        views = [torch.randn(shape, generator=generator).to(device) for _ in range(2)]
    labels = torch.arange(config.batch_size, device=device) % 10
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision or "no")
    step_number = [max(config.start1_hard, config.start2_hard)]  # mixing active

    def step() -> None:
        view_q, view_k = photometric(*views, step_number[0]) if photometric else views
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if bare:
                moco.encoder_q(view_q).sum().backward()
                with torch.no_grad():
                    moco.encoder_k(view_k)
            else:
                ids = torch.arange(config.batch_size, device=device) + step_number[0] * config.batch_size
                loss, _ = moco(view_q, view_k, ids, labels, step=step_number[0])
                loss.backward()
        if not bare:
            grad_norm = torch.nn.utils.clip_grad_norm_(moco.encoder_q.parameters(), config.clip_grad or math.inf)
            moco.momentum_update(guard.step(grad_norm))
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_number[0] += 1

    return config.batch_size / _seconds_per_step(step, warmup=warmup, measure=measure, device=device)


def full_trainer_images_per_s(config, *, images: int, warmup: int, measure: int) -> float:
    """images/s of `hnmix.train.train` itself (data pipeline included), from its metrics.jsonl."""
    from hnmix.train import train

    with tempfile.TemporaryDirectory(prefix="hnmix-bench-") as tmp:
        if config.dataset == GENERATED:
            Console().log(f"writing {images} generated JPEGs")
            config = replace(config, dataset=str(write_jpeg_folder(Path(tmp) / "images", count=images)))
        steps = warmup + measure
        config = replace(config, dir_out=str(Path(tmp) / "out"), steps=steps, steps_print=1, steps_save=steps,
                         keep_checkpoints=1, stop_at=None, resume=None)
        train(config)
        records = [json.loads(line) for line in (Path(tmp) / "out/metrics.jsonl").read_text().splitlines()]
    return steady_images_per_s(records[warmup:])


GENERATED = "generated-jpegs"  # --dataset default of `bench train`: JPEGs written for the run


def worker_pipeline_images_per_s(directory: Path, *, img_size: int, workers: int, batches: int, batch_size: int,
                                 photometric_in_workers: bool) -> float:
    """Images/s (each giving two views) of `workers` DataLoader workers over `batches` batches
    after the first (which includes the workers' start-up): decode, crop and flip to uint8 views
    (for `--augment_device accelerator`), or with the photometric half per image too (`cpu`)."""
    from hnmix.augment import moco_v2_photometric
    from hnmix.data import TwoViewDataset, load_image_dataset, make_train_loader, resolve_columns

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
    (`hnmix.images.decode_jpeg_upright`): the floor of any per-image pipeline that needs the
    full-size pixels."""
    from hnmix.images import decode_jpeg_upright

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
    from hnmix.photometric import StepPhotometric

    generator = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=generator).to(device)
             for _ in range(2)]
    photometric = StepPhotometric(img_size, seed=0, rank=0)
    step = iter(range(1_000_000))
    seconds = _seconds_per_step(lambda: photometric(*views, next(step)), warmup=1, measure=repeats, device=device)
    return batch_size / seconds


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    """The worker pipeline's images/s for 1..W workers on generated JPEGs, in both augmentation
    modes, with the decoding floor and the batched photometric half on the current device."""
    size = tuple(int(v) for v in args.jpeg_size.split("x")) if args.jpeg_size else None
    device = torch.device(args.device)
    modes = {"accelerator": False, "cpu": True}  # --augment_device -> photometric half in the workers?
    rows: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    with tempfile.TemporaryDirectory(prefix="hnmix-bench-") as tmp:
        directory = write_jpeg_folder(Path(tmp) / "images", count=args.images, size=size)
        decode_floor = decode_images_per_s(directory)
        for mode, photometric_in_workers in modes.items():
            for workers in range(1, args.max_workers + 1):
                rows[mode][workers] = worker_pipeline_images_per_s(
                    directory, img_size=args.img_size, workers=workers, batches=args.batches,
                    batch_size=args.batch_size, photometric_in_workers=photometric_in_workers)
    photometric = batched_photometric_images_per_s(img_size=args.img_size, batch_size=args.batch_size, device=device,
                                                   repeats=args.repeats)
    table = Table(title=f"Data pipeline: two {args.img_size}px views per image, {args.jpeg_size or 'Caltech-256-like'} "
                        "JPEGs (images/s)")
    for column in ("pipeline", "workers", "images/s", "per core"):
        table.add_column(column, justify="right")
    table.add_row("JPEG decode alone, full size (the floor)", "1", f"{decode_floor:.0f}", f"{decode_floor:.0f}")
    titles = {"accelerator": "workers: decode, crop, flip -> uint8", "cpu": "workers: + photometric per image"}
    for mode, per_workers in rows.items():
        for workers, images_per_s in per_workers.items():
            table.add_row(titles[mode], str(workers), f"{images_per_s:.0f}", f"{images_per_s / workers:.0f}")
    table.add_row(f"batched photometric on {device_description(device)}, batch {args.batch_size}", "-",
                  f"{photometric:.0f}", "-")
    Console().print(table)
    return {"images_per_s": rows["accelerator"], "per_core_images_per_s": {w: v / w for w, v in rows["accelerator"].items()},
            "photometric_in_workers": {"images_per_s": rows["cpu"],
                                       "per_core_images_per_s": {w: v / w for w, v in rows["cpu"].items()}},
            "decode_only_images_per_s": decode_floor,
            "batched_photometric": {"images_per_s": photometric, "device": device_description(device),
                                    "batch_size": args.batch_size},
            "img_size": args.img_size, "jpeg_size": args.jpeg_size or "caltech-like", "torch": torch.__version__,
            "cpu": _cpu_model()}


def run_train(args: argparse.Namespace, trainer_argv: Sequence[str]) -> dict[str, Any]:
    """The trainer against its ceiling: bare encoder loop, in-memory MoCo and MoCHi, full trainer."""
    from hnmix.config import parse_config

    argv = [*SEED_TRAIN_OPTIONS, "--num_workers", str(os.cpu_count() or 1), "--eval_every", "0",
            "--dataset", GENERATED, *trainer_argv]
    config = parse_config(argv)
    device = torch.device("cpu" if config.device == "cpu" or not torch.cuda.is_available() else "cuda")
    plain = replace(config, s1_hard=0, s2_hard=0)
    timing = dict(warmup=args.warmup_steps, measure=args.measure_steps)
    rows = {
        "bare loop (encoder fwd+bwd, key fwd; in-memory)": in_memory_images_per_s(config, device=device, bare=True, **timing),
        "plain MoCo step, in-memory (s1 = s2 = 0)": in_memory_images_per_s(plain, device=device, bare=False, **timing),
        "MoCHi step, in-memory": in_memory_images_per_s(config, device=device, bare=False, **timing),
        "full trainer (data pipeline)": full_trainer_images_per_s(config, images=args.images, **timing),
    }
    ceiling = rows["bare loop (encoder fwd+bwd, key fwd; in-memory)"]
    table = Table(title=f"hnmix.train, {config.arch} {config.img_size}px, batch {config.batch_size}, "
                        f"K={config.k_moco}, n_hard={config.n_hard}, s1={config.s1_hard}, s2={config.s2_hard}, "
                        f"{config.mixed_precision or 'accelerate default'} precision, {device_description(device)}")
    table.add_column("run")
    table.add_column("images/s", justify="right")
    table.add_column("of the bare loop", justify="right")
    for name, images_per_s in rows.items():
        table.add_row(name, f"{images_per_s:.1f}", f"{images_per_s / ceiling:.0%}")
    console = Console()
    console.print(table)
    mochi_cost = rows["plain MoCo step, in-memory (s1 = s2 = 0)"] / rows["MoCHi step, in-memory"] - 1
    console.print(f"MoCHi costs {mochi_cost:+.1%} over plain MoCo (in-memory steps)")
    return {"images_per_s": rows, "ratio_to_bare_loop": {k: v / ceiling for k, v in rows.items()},
            "mochi_cost_over_moco": mochi_cost, "trainer_images_per_s": rows["full trainer (data pipeline)"],
            "warmup_steps": args.warmup_steps, "measured_steps": args.measure_steps, "config": config.to_dict(),
            "torch": torch.__version__, "device": device_description(device)}


# ----------------------------------------------------------------------------- CLI


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mixing_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch", type=int, default=256, help="B, queries per step")
    p.add_argument("--queue", type=int, default=65536, help="K, queue size")
    p.add_argument("--dim", type=int, default=128, help="d, embedding size")
    p.add_argument("--n_hard", type=int, default=1024, help="hard negatives per query")
    p.add_argument("--s1", type=int, default=1024, help="type-1 synthetic negatives per query")
    p.add_argument("--s2", type=int, default=512, help="type-2 synthetic negatives per query")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--device", default=_default_device())
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of q and k")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser = argparse.ArgumentParser(prog="python -m hnmix.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mixing = commands.add_parser(
        "mixing", parents=[common, _mixing_options()], help="time and memory of MoCo vs MoCHi logits",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mixing.set_defaults(func=run_mixing)
    train = commands.add_parser(
        "train", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="images/s of the full trainer; options it does not know go to hnmix.train "
             "(default: the seed configuration on generated JPEGs)",
    )
    train.add_argument("--warmup_steps", type=int, default=3, help="steps not measured")
    train.add_argument("--measure_steps", type=int, default=10, help="steps measured")
    train.add_argument("--images", type=int, default=512, help="generated JPEGs when no --dataset is given")
    train.set_defaults(func=run_train)
    data = commands.add_parser("data", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                               help="images/s of the DataLoader worker pipeline for 1..W workers")
    data.add_argument("--max_workers", type=int, default=os.cpu_count() or 1)
    data.add_argument("--img_size", type=int, default=224)
    data.add_argument("--jpeg_size", default=None, help="WxH of every generated JPEG, e.g. 768x512 (default: varied)")
    data.add_argument("--images", type=int, default=256)
    data.add_argument("--batches", type=int, default=8, help="batches measured per worker count")
    data.add_argument("--batch_size", type=int, default=32)
    data.add_argument("--device", default=_default_device(), help="device of the batched photometric row")
    data.add_argument("--repeats", type=int, default=3, help="timed batches of the batched photometric row")
    data.set_defaults(func=run_data)
    # Hidden (no help=): the CPU peak-memory measurement of one variant in a fresh process.
    peak = commands.add_parser("_mixing_peak", parents=[_mixing_options()])
    peak.add_argument("--variant", choices=VARIANTS, required=True)
    peak.set_defaults(func=run_mixing_peak)
    return parser


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.func is run_train:
        payload = run_train(args, rest)
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        payload = args.func(args)
    if payload is not None and getattr(args, "json", None) is not None:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
