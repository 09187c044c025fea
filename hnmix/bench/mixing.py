"""`python -m hnmix.bench mixing`: MoCHi's logits against plain MoCo and a materialising implementation.

Times one forward + backward of the contrastive loss (logits, cross entropy with target 0,
backward to q) on random unit vectors, for three variants:

  moco          plain MoCo: `mix_logits` with n_hard = 0 and no synthetic negatives;
  hnmix         MoCHi as hnmix computes it: `mix_logits` with n_hard and each type's count (s1, s2);
  materialised  MoCHi the naive way (`materialised_mochi_logits`): the hard negatives gathered
                into [B, s, d] tensors, mixed, normalised and multiplied with q.

Inputs: q, k [B, d] in `--dtype`, as the encoders give them under autocast; the queue [K, d] in
float32, as `hnmix.moco.KeyQueue` stores it; dataset ids with the occasional duplicate, so the
duplicate mask is exercised. Time: the median over `--repeats` calls after `--warmup`, the
variants taking turns call by call, so that a busy spell of the machine does not land on one only.

Peak extra memory, one call per variant after the timing (None with `--no_peak`): on CUDA
`max_memory_allocated` minus `memory_allocated` before, the peak statistics reset just before;
on the CPU in a fresh interpreter per variant (the hidden `_mixing_peak` subcommand): the variant
once at a tiny size (lazily loaded kernels and thread pools not counted), the resident-set
high-water mark reset, then the mark after the call minus the resident set before
(`hnmix.bench.system`). Where the mark cannot be reset the number is an upper bound (`peak_reset`
false, `(<=)` in the table). Pages allocated but never touched do not count.

The last line checks the target of hnmix: the time mixing adds over plain MoCo should be at most
half of what the materialising implementation adds.
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

VARIANT_LABELS = {"moco": "plain MoCo", "hnmix": "MoCHi, hnmix", "materialised": "MoCHi, materialising"}
VARIANTS = tuple(VARIANT_LABELS)
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


def _peak(extra_bytes: int, method: str, peak_reset: bool) -> dict[str, Any]:
    """A variant's peak extra memory as the JSON has it; peak_reset False: an upper bound."""
    return {"peak_extra_bytes": extra_bytes, "peak_extra_mib": extra_bytes / MIB, "peak_method": method,
            "peak_reset": peak_reset}


NO_PEAK = dict.fromkeys(("peak_extra_bytes", "peak_extra_mib", "peak_method", "peak_reset"))


def cuda_peak(variant: str, x: MixingInputs, cfg: MixingConfig) -> dict[str, Any]:
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
    return _peak(extra, "cuda max_memory_allocated - memory_allocated", True)


def cpu_peak_in_this_process(variant: str, cfg: MixingConfig) -> dict[str, Any]:
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
    return _peak(extra, "fresh process: VmHWM (peak RSS) after - /proc/self/statm RSS before", reset)


def cpu_peak(variant: str, cfg: MixingConfig) -> dict[str, Any]:
    """Run `cpu_peak_in_this_process` in a fresh interpreter and read its JSON line."""
    command = [sys.executable, "-m", "hnmix.bench", "_mixing_peak", "--variant", variant, *mixing_argv(cfg)]
    root = str(Path(__file__).resolve().parents[2])  # the repository, which holds hnmix/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_peak(variant: str, x: MixingInputs, cfg: MixingConfig) -> dict[str, Any]:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        return cuda_peak(variant, x, cfg)
    if device.type == "cpu" and Path("/proc/self/statm").exists():
        return cpu_peak(variant, cfg)
    return NO_PEAK


def print_mixing_report(console: Console, cfg: MixingConfig, payload: dict[str, Any]) -> None:
    sizes = " ".join(f"{name}={n}" for name, n in cfg.sizes.items())
    table = Table(title=f"fwd+bwd, B={cfg.batch} K={cfg.queue} d={cfg.dim} n_hard={cfg.n_hard} "
                        f"{sizes} {cfg.dtype} on {cfg.device}")
    for column in ("variant", "ms per fwd+bwd", "added over plain MoCo (ms)", "peak extra (MiB)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, r in payload["variants"].items():
        peak = "n/a" if r["peak_reset"] is None else f"{r['peak_extra_mib']:.1f}{'' if r['peak_reset'] else ' (<=)'}"
        table.add_row(VARIANT_LABELS[name], f"{r['ms_median']:.2f}", f"{r['ms_added_over_moco']:+.2f}", peak)
    console.print(table)
    ratio = payload["ratio"]
    ratio_text = "n/a (the materialising oracle adds nothing)" if ratio is None else f"{ratio:.3f}"
    console.print(
        f"mixing adds {payload['mixing_added_ms']:.2f} ms over plain MoCo, the materialising oracle adds "
        f"{payload['materialised_added_ms']:.2f} ms: ratio {ratio_text} (target <= {TARGET_RATIO})"
    )


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
    variants = {}
    for v in VARIANTS:
        peak = NO_PEAK
        if not getattr(args, "no_peak", False):
            console.log(f"peak memory of {VARIANT_LABELS[v]}")
            peak = measure_peak(v, x, cfg)
        variants[v] = {"ms_median": statistics.median(times[v]), "ms_all": times[v],
                       "ms_added_over_moco": statistics.median(times[v]) - statistics.median(times["moco"]), **peak}
    added, oracle_added = variants["hnmix"]["ms_added_over_moco"], variants["materialised"]["ms_added_over_moco"]
    ratio = added / oracle_added if oracle_added > 0 else None
    device = device_description(torch.device(cfg.device))
    payload = {"command": "mixing", "config": config_fields(cfg), "device": device, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "variants": variants, "mixing_added_ms": added, "materialised_added_ms": oracle_added,
               "ratio": ratio, "target_ratio": TARGET_RATIO, "meets_target": None if ratio is None else ratio <= TARGET_RATIO}
    print_mixing_report(console, cfg, payload)
    return payload


def run_mixing_peak(args: argparse.Namespace) -> None:
    """Hidden: one variant's peak memory in this (fresh) process, printed as a JSON line."""
    print(json.dumps(cpu_peak_in_this_process(args.variant, mixing_config(args))))
