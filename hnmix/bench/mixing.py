"""`python -m hnmix.bench mixing`: MoCHi's logits against plain MoCo and a materialising implementation.

``mixing`` times one forward + backward of the contrastive loss (logits, cross entropy with
target 0, backward to ``q``) on random L2-normalised inputs, for three variants:

  moco          plain MoCo: `mix_logits` with n_hard = 0 and no synthetic negatives;
  hnmix         MoCHi as hnmix computes it: `mix_logits` with n_hard and each type's count (s1, s2);
  materialised  MoCHi the naive way (`materialised_mochi_logits` below): the hard negatives are
                gathered into [B, s, d] tensors, mixed, normalised and multiplied with q.

Inputs: q [B, d] (``--dtype``, requires grad) and k [B, d] in ``--dtype``, as the encoders give
them under autocast; the queue [K, d] in float32, as `hnmix.moco.KeyQueue` stores it; dataset ids
for the batch and the queue, with the occasional duplicate, so the duplicate mask is exercised.

Time: the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, with
``torch.cuda.synchronize`` around each call on a GPU. The variants take turns call by call, so
a busy spell of the machine does not land on one variant only.

Peak extra memory, one forward + backward per variant after the timing (not measured, None, with
``--no_peak``):
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
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from hnmix.bench.system import (
    MIB,
    _peak_rss_bytes,
    _reset_peak_rss,
    _rss_bytes,
    _synchronize,
    device_description,
)
from hnmix.mixing import NEGATIVE_TYPES, active_types, draw_types, mix_logits, validate_mixing_arguments

VARIANTS = ("moco", "hnmix", "materialised")


VARIANT_LABELS = {
    "moco": "plain MoCo",
    "hnmix": "MoCHi, hnmix",
    "materialised": "MoCHi, materialising",
}


TARGET_RATIO = 0.5


SEED = 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def materialised_mochi_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int,
    ids: Optional[torch.Tensor] = None,
    queue_ids: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    **sizes: int,
) -> torch.Tensor:
    """The logits of `hnmix.mixing.mix_logits` computed the naive way, in float32, for every registered type.

    Every synthetic negative is built as a vector: the mixed vectors are gathered into [B, s, d]
    tensors (`index_select`), mixed, L2-normalised and multiplied with q (bmm). The hard set is
    the same top-n_hard selection and the random draws are `draw_types`', taken in the same order
    from `generator`, so with equally seeded generators both functions return the same logits and
    gradients. The mixed vectors are constants (the queue and q are detached).
    """
    validate_mixing_arguments(q, k, queue, temperature=temperature, n_hard=n_hard, ids=ids, queue_ids=queue_ids,
                              **sizes)
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
    active = active_types(sizes)
    if active:
        hard_indices = neg.detach().topk(n_hard, dim=1).indices  # [B, n_hard], best first
        n_valid = n_unmasked.clamp_max(n_hard)
        draws = draw_types(n_valid, active, generator)
    for kind, _ in active:
        x_positions, y_positions, a = draws.of(kind.name)
        y = _gather_rows(queue, hard_indices.gather(1, y_positions))  # [B, s, d]
        x = (q.detach().unsqueeze(1) if x_positions is None
             else _gather_rows(queue, hard_indices.gather(1, x_positions)))
        a = a.unsqueeze(2)
        mixed = _dot_with_mixed(q, a * x + (1 - a) * y)
        columns.append(mixed.masked_fill((n_valid < kind.hard_needed).unsqueeze(1), float("-inf")))
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


@dataclass(frozen=True)
class MixingConfig:
    batch: int
    queue: int
    dim: int
    n_hard: int
    temperature: float
    repeats: int
    warmup: int
    device: str
    dtype: str
    sizes: dict[str, int]  # each registered type's count by its size keyword ("s1")


def config_fields(cfg: MixingConfig) -> dict[str, Any]:
    """The fields of cfg with each type's count in place of `sizes`, by the flags' names."""
    fields = asdict(cfg)
    sizes = fields.pop("sizes")
    return fields | sizes


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
    sizes = {"n_hard": 0} if variant == "moco" else {"n_hard": cfg.n_hard, **cfg.sizes}
    options = dict(temperature=cfg.temperature, ids=x.ids, queue_ids=x.queue_ids, generator=generator, **sizes)
    if variant == "materialised":
        return materialised_mochi_logits(x.q, x.k, x.queue, **options)
    return mix_logits(x.q, x.k, x.queue, **options).logits


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


def cpu_peak_in_this_process(variant: str, cfg: MixingConfig) -> PeakMemory:
    """Peak RSS increase of one call; meant for a fresh interpreter (`_mixing_peak`)."""
    x = make_inputs(cfg)
    tiny = replace(cfg, batch=4, queue=8, dim=4, n_hard=min(cfg.n_hard, 4),
                   sizes={name: min(n, 2) for name, n in cfg.sizes.items()})
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
    root = str(Path(__file__).resolve().parents[2])  # the repository, which holds hnmix/
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


@dataclass
class VariantResult:
    ms_median: float
    ms_all: list[float]
    ms_added: float  # over plain MoCo
    peak: Optional[PeakMemory]


def _ratio(mixing_added: float, materialised_added: float) -> Optional[float]:
    return mixing_added / materialised_added if materialised_added > 0 else None


def print_mixing_report(console: Console, cfg: MixingConfig, results: dict[str, VariantResult]) -> None:
    sizes = " ".join(f"{name}={n}" for name, n in cfg.sizes.items())
    table = Table(title=f"fwd+bwd, B={cfg.batch} K={cfg.queue} d={cfg.dim} n_hard={cfg.n_hard} "
                        f"{sizes} {cfg.dtype} on {cfg.device}")
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
        "config": config_fields(cfg),
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


def mixing_config(args: argparse.Namespace) -> MixingConfig:
    return MixingConfig(
        batch=args.batch, queue=args.queue, dim=args.dim, n_hard=args.n_hard,
        temperature=args.temperature, repeats=args.repeats, warmup=args.warmup,
        device=args.device, dtype=args.dtype, sizes={t.size: getattr(args, t.size) for t in NEGATIVE_TYPES.values()},
    )


def mixing_argv(cfg: MixingConfig) -> list[str]:
    """The command-line options that rebuild `cfg` (for the `_mixing_peak` subprocess)."""
    return [f"--{name}={value}" for name, value in config_fields(cfg).items()]


def run_mixing(args: argparse.Namespace) -> dict[str, Any]:
    cfg = mixing_config(args)
    console = Console()
    x = make_inputs(cfg)
    console.log(f"timing {', '.join(VARIANTS)}: {cfg.warmup} warmup + {cfg.repeats} timed calls each, interleaved")
    times = time_variants(VARIANTS, x, cfg)
    peaks: dict[str, Optional[PeakMemory]] = {variant: None for variant in VARIANTS}
    for variant in () if getattr(args, "no_peak", False) else VARIANTS:
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
