"""`python -m hnmix.bench overhead`: kernel launches per training step, counted on the CPU.

On a GPU every op is at least one kernel launch, and each costs the host a few microseconds
whatever its size: a step of small ops is host-bound. The count needs no GPU. Two rows per model,
`bn_splits` and `--modes` entry: the bare loop (`bare_step`: the network alone, unsplit, the least
any MoCo trainer launches) and the trainer's step (`trainer_step`: `hnmix.train.step.TrainStep` on
in-memory views, MoCHi from the first step; compiled as `--compile --compile_mode` does for a mode
other than eager, whose aten count is then not comparable, its CUDA launches are).

Counting rule: a top-level aten call (no other aten call encloses it) that does work; views,
reshapes and allocations (`NOT_WORK`) are left out, and where one of them copies, the ops it calls
count instead. Host reads (`HOST_READS`) count and are also reported on their own. On a GPU a row
also counts the CUDA runtime's launches (`CUDA_LAUNCHES`) and the kernels' busy time, and each row
is timed (`time_steps`). BENCHMARKS.md, "Kernel launches per training step", reads the columns.

Options it does not know go to `hnmix.train`; without `--config` its defaults are the issue's
measurement (32 px, batch 16, SGD, on the CPU), with one the recipe's values stand.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from hnmix.bench.system import _synchronize, device_description
from hnmix.train.config import COMPILE_MODES

# Views, reshapes and allocations: no kernel of their own (a copying one counts through its children).
NOT_WORK = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "scalar_tensor",
    "lift_fresh", "view", "view_as", "_unsafe_view", "_reshape_alias", "as_strided", "expand", "expand_as",
    "t", "numpy_T", "transpose", "permute", "movedim", "moveaxis", "reshape", "reshape_as", "flatten",
    "unflatten", "unsqueeze", "squeeze", "slice", "select", "narrow", "split", "split_with_sizes", "chunk",
    "unbind", "tensor_split", "diagonal", "alias", "detach", "detach_", "resolve_conj", "resolve_neg",
    "contiguous", "to", "type_as", "view_as_real", "view_as_complex", "unfold",
})
HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::item"})
# The CUDA runtime calls that put work on the device: what a GPU's host pays per launch.
CUDA_LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                           "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync"})
DEFAULT_TRAIN_OPTIONS = ["--img_size", "32", "--batch_size", "16", "--optimizer", "sgd", "--device", "cpu"]
MODES = ("eager", *COMPILE_MODES)
RULE = ("torch.profiler on the CPU: top-level aten ops that do work (views, reshapes and allocations left out), "
        "per step, after one warm-up step")


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def work_ops(events: Iterable) -> Counter:
    """op name -> how many times it ran, over the profiler's `events`, by the counting rule."""
    counts: Counter = Counter()

    def visit(event) -> None:
        if event.name.removeprefix("aten::") not in NOT_WORK:
            counts[event.name] += 1
            return
        for child in event.cpu_children:
            if child.name.startswith("aten::"):
                visit(child)

    for event in events:
        if event.name.startswith("aten::") and not _has_aten_ancestor(event):
            visit(event)
    return counts


def ops_per_step(step: Callable[[], None], *, warmup: int = 1, measure: int = 2) -> Counter:
    """op name -> its mean count per call of `step`, over `measure` profiled calls after `warmup`."""
    return profile_steps(step, warmup=warmup, measure=measure)["ops"]


def profile_steps(step: Callable[[], None], *, warmup: int, measure: int,
                  device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Per call of `step`, means over `measure` profiled calls after `warmup`: `ops` (op name ->
    count, by the counting rule) and, on a GPU, `cuda_launches` and `gpu_busy_ms` (else None)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with profile(activities=activities) as profiler:
        for _ in range(measure):
            step()
        _synchronize(device)
    events = profiler.events()
    result = {"ops": Counter({name: count / measure for name, count in work_ops(events).items()}),
              "cuda_launches": None, "gpu_busy_ms": None}
    if on_gpu:
        result["cuda_launches"] = sum(event.name in CUDA_LAUNCHES for event in events) / measure
        device_us = sum(event.time_range.elapsed_us() for event in events
                        if event.device_type == torch.autograd.DeviceType.CUDA)
        result["gpu_busy_ms"] = device_us / 1000 / measure
    return result


def time_steps(step: Callable[[], None], *, steps: int, device: torch.device) -> dict[str, float]:
    """`host_ms`: the median time the host takes to issue one `step`, the device drained before
    each; `step_ms`: `steps` calls back to back, per call (CUDA events on a GPU, else wall time)."""
    host_s = []
    for _ in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        step()
        host_s.append(time.perf_counter() - started)
    _synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        step_ms = start.elapsed_time(end) / steps
    else:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        step_ms = (time.perf_counter() - started) * 1000 / steps
    return {"host_ms": statistics.median(host_s) * 1000, "step_ms": step_ms}


def bare_step(config, device: torch.device) -> Callable[[], None]:
    """The bare loop of `config`'s network (its BatchNorm unsplit): query forward + backward, key forward."""
    from hnmix.train.components import build_model  # bench may import the trainer; not the reverse

    moco = build_model(config.model, replace(config.method, bn_splits=1), (0, 0), seed=config.run.seed)
    moco = moco.to(device).train()
    generator = torch.Generator().manual_seed(0)
    shape = (config.optimization.batch_size, 3, config.data.img_size, config.data.img_size)
    view_q, view_k = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.run.mixed_precision or "no")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            moco.encoder_q(view_q).sum().backward()
            with torch.no_grad():
                moco.encoder_k(view_k)
        moco.encoder_q.zero_grad(set_to_none=True)

    return step


def trainer_step(config, *, calls: int) -> tuple[Callable[[], None], torch.device]:
    """The trainer's step as the loop makes it, built as the loop builds its parts (compiled under
    `config.run.compile`), over `calls` in-memory batches, made beforehand so that no op of the
    bench's own counts (a step past them reuses them in turn); and its device."""
    from hnmix.data.photometric import StepPhotometric
    from hnmix.train.components import (
        augment_on_accelerator,
        build_model,
        build_optimizer,
        compile_step,
        make_accelerator,
    )
    from hnmix.train.metrics import RunningCount, StatsWindow
    from hnmix.train.optim import NonFiniteGuard
    from hnmix.train.schedule import lr_schedule, momentum_schedule
    from hnmix.train.step import TrainStep

    accelerator = make_accelerator(config.run)
    device = accelerator.device
    model = build_model(config.model, config.method, (0, 0), seed=config.run.seed)  # mixing from the first step
    optimizer = build_optimizer(config.optimization, model.encoder_q, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.optimization))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step_model = compile_step(model, config.run.compile_mode) if config.run.compile else model
    on_accelerator = augment_on_accelerator(config.data, device)
    photometric = (StepPhotometric(config.data.img_size, seed=config.run.seed, rank=0, augmentation=config.augmentation)
                   if on_accelerator else None)
    train_step = TrainStep(
        model=step_model, moco=accelerator.unwrap_model(model), accelerator=accelerator, optimizer=optimizer,
        scheduler=scheduler, guard=NonFiniteGuard(optimizer, config.optimization.max_nonfinite_steps, device=device),
        window=StatsWindow(), bad_images=RunningCount(),
        momentum_at=momentum_schedule(config.method, config.optimization.steps),
        clip_grad=config.optimization.clip_grad, photometric=photometric, has_labels=True,
    )
    generator = torch.Generator().manual_seed(0)
    B = config.optimization.batch_size
    shape = (B, 3, config.data.img_size, config.data.img_size)
    if photometric:
        views = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device) for _ in range(2)]
    else:
        views = [torch.randn(shape, generator=generator).to(device) for _ in range(2)]
    batches = [(torch.arange(B, device=device) + call * B, torch.arange(B, device=device) % 10,
                torch.zeros(B, dtype=torch.long, device=device)) for call in range(calls)]
    model.train()
    done = [0]

    def step() -> None:
        if config.run.compile:
            torch.compiler.cudagraph_mark_step_begin()  # as the loop does
        ids, labels, unreadable = batches[done[0] % calls]
        train_step(*views, ids, labels, unreadable, done[0])
        done[0] += 1

    return step, device


def count_row(config, *, warmup: int, measure: int, timed: int, bare: Optional[dict] = None) -> dict[str, Any]:
    """The counts and times of one configuration: bare loop (or `bare`, already measured for its
    network) and trainer."""
    step, device = trainer_step(config, calls=warmup + measure)
    trainer = profile_steps(step, warmup=warmup, measure=measure, device=device)
    trainer |= time_steps(step, steps=timed, device=device)
    if bare is None:
        bare_loop = bare_step(config, device)
        bare = profile_steps(bare_loop, warmup=warmup, measure=measure, device=device)
        bare |= time_steps(bare_loop, steps=timed, device=device)
    extra = Counter(trainer["ops"])
    extra.subtract(bare["ops"])
    bare_total, trainer_total = sum(bare["ops"].values()), sum(trainer["ops"].values())
    row = {
        "arch": config.model.arch, "bn_splits": config.method.bn_splits,
        "mode": config.run.compile_mode if config.run.compile else "eager",
        "bare": bare_total, "trainer": trainer_total, "ratio": trainer_total / bare_total,
        "device": device_description(device),
        "trainer_host_reads": sum(trainer["ops"][name] for name in HOST_READS),
        "trainer_extra_by_op": {name: count for name, count in extra.most_common() if count},
        "bare_by_op": dict(bare["ops"].most_common()), "trainer_by_op": dict(trainer["ops"].most_common()),
        "_bare": bare,
    }
    for name, measured in (("bare", bare), ("trainer", trainer)):
        for key in ("cuda_launches", "gpu_busy_ms", "host_ms", "step_ms"):
            row[f"{name}_{key}"] = measured[key]
        row[f"{name}_images_per_s"] = config.optimization.batch_size * 1000 / measured["step_ms"]
    return row


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def _mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"{text} is not a mode; choose from {','.join(MODES)}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", type=_comma_list(str), default=None,
                        help="rows: these models, e.g. resnet18,resnet50 (default: the trainer's --arch)")
    parser.add_argument("--splits", type=_comma_list(int), default=None,
                        help="rows: these --bn_splits, e.g. 1,8 (default: the trainer's --bn_splits)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="steps run before counting")
    parser.add_argument("--measure_steps", type=int, default=2, help="steps counted (the mean is reported)")
    parser.add_argument("--time_steps", type=int, default=5, help="steps timed after the counted ones")
    parser.add_argument("--modes", type=_comma_list(_mode), default=["eager"],
                        help=f"rows: the trainer's step eager and/or compiled in these --compile_mode's, of {MODES}")


def run_overhead(args: argparse.Namespace, trainer_argv: Sequence[str]) -> dict[str, Any]:
    """Launches and times per step of the bare loop and the trainer's step, for each row; a table
    and the JSON payload."""
    from hnmix.train.components import check_arch
    from hnmix.train.config import parse_config

    defaults = [] if "--config" in trainer_argv else DEFAULT_TRAIN_OPTIONS
    given = [*defaults, *trainer_argv, "--eval_every", "0"]
    base = parse_config(given)
    rows, bare_of = [], {}
    console = Console()
    for arch in args.archs or [base.model.arch]:
        for splits in args.splits or [base.method.bn_splits]:
            for mode in args.modes:
                compiled = [] if mode == "eager" else ["--compile", "--compile_mode", mode]
                config = parse_config([*given, "--arch", arch, "--bn_splits", str(splits), *compiled])
                check_arch(config.model.arch, config.model.stem, config.model.resnet_init)  # an unknown model is one line
                warmup = args.warmup_steps if mode == "eager" else max(args.warmup_steps, 3)  # compiles, records
                row = count_row(config, warmup=warmup, measure=args.measure_steps, timed=args.time_steps,
                                bare=bare_of.get(arch))
                bare_of[arch] = row.pop("_bare")
                console.log(f"{arch}, bn_splits {splits}, {mode}: bare {row['bare']:,.0f}, trainer "
                            f"{row['trainer']:,.0f} ({row['ratio']:.2f}x), {row['trainer_images_per_s']:,.0f} images/s")
                rows.append(row)
    table = Table(title=f"Kernel launches per step ({RULE}, mean of {args.measure_steps}); {base.data.img_size} px, "
                        f"batch {base.optimization.batch_size}, n_hard {base.method.n_hard}, "
                        f"s1 {base.method.s1_hard}, s2 {base.method.s2_hard}, "
                        f"{base.optimization.optimizer}, {base.run.mixed_precision or 'no'} mixed precision; times over "
                        f"{args.time_steps} steps")
    columns = ("model", "bn_splits", "mode", "bare loop", "trainer step", "trainer / bare", "CUDA launches",
               "host ms", "GPU busy ms", "step ms", "images/s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for row in rows:
        launches = row["trainer_cuda_launches"]
        table.add_row(row["arch"], str(row["bn_splits"]), row["mode"], f"{row['bare']:,.0f}", f"{row['trainer']:,.0f}",
                      f"{row['ratio']:.2f}x", "-" if launches is None else f"{launches:,.0f}",
                      _ms(row["trainer_host_ms"]), _ms(row["trainer_gpu_busy_ms"]), _ms(row["trainer_step_ms"]),
                      f"{row['trainer_images_per_s']:,.0f}")
    Console(width=max(console.width, 150)).print(table)  # eleven columns: wider than a log's 80
    return {"rule": RULE, "warmup_steps": args.warmup_steps, "measured_steps": args.measure_steps,
            "timed_steps": args.time_steps, "rows": rows, "config": base.options(), "torch": torch.__version__}
