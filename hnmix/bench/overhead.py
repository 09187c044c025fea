"""`python -m hnmix.bench overhead`: kernel launches per training step, counted on the CPU.

On a GPU every op of a step is at least one kernel launch, and each launch costs the host a few
microseconds whatever the op's size: a step of small ops is host-bound. The count needs no GPU.
Two rows per model and `bn_splits`:

- the bare loop: the query encoder's forward and backward and the key encoder's forward, the
  network alone (`bn_splits 1`), without any MoCo machinery: the least any MoCo trainer launches;
- the trainer's step: `hnmix.train.step.TrainStep`, the call the training loop makes per batch,
  with the loop's parts (Accelerate, the guarded optimizer, momentum update, queue, split BN,
  mixing, statistics), on in-memory views, MoCHi from the first step.

Counting rule: torch.profiler on the CPU; an op is a top-level aten call (no other aten call
encloses it) that does work: views, reshapes and allocations (`NOT_WORK`: empty, empty_strided,
view, as_strided, expand, t, transpose, permute, reshape, detach, alias, unsqueeze, squeeze,
slice, select, resolve_conj, ...) are left out, and where one of them copies (a reshape of a
non-contiguous tensor, `contiguous`, `to`) the ops it calls count instead. One warm-up step, then
`--measure_steps` profiled steps; a row reports their mean. Host reads (`item`, i.e.
`_local_scalar_dense`) count as ops and are also reported on their own: the trainer's step has
none.

Options it does not know go to `hnmix.train`; its defaults are the issue's measurement: 32 px,
batch 16, SGD, on the CPU.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from hnmix.bench.system import device_description

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
DEFAULT_TRAIN_OPTIONS = ["--img_size", "32", "--batch_size", "16", "--optimizer", "sgd", "--device", "cpu",
                         "--eval_every", "0"]
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
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(measure):
            step()
    return Counter({name: count / measure for name, count in work_ops(profiler.events()).items()})


def _autocast_dtype(config) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision or "no")


def bare_step(config, device: torch.device) -> Callable[[], None]:
    """The bare loop of `config`'s network (its BatchNorm unsplit): query forward + backward, key forward."""
    from hnmix.train.components import build_model  # bench may import the trainer; not the reverse

    moco = build_model(replace(config, bn_splits=1), curriculum=(0, 0)).to(device).train()
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, 3, config.img_size, config.img_size)
    view_q, view_k = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    dtype = _autocast_dtype(config)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            moco.encoder_q(view_q).sum().backward()
            with torch.no_grad():
                moco.encoder_k(view_k)
        moco.encoder_q.zero_grad(set_to_none=True)

    return step


def trainer_step(config, *, calls: int) -> tuple[Callable[[], None], torch.device]:
    """The trainer's step as the loop makes it, built as the loop builds its parts, over `calls`
    in-memory batches (made beforehand, so that no op of the bench's own counts); and its device."""
    from hnmix.data.photometric import StepPhotometric
    from hnmix.train.components import (
        augment_on_accelerator,
        build_model,
        build_optimizer,
        make_accelerator,
    )
    from hnmix.train.metrics import RunningCount, StatsWindow
    from hnmix.train.optim import NonFiniteGuard
    from hnmix.train.schedule import lr_schedule, momentum_schedule
    from hnmix.train.step import TrainStep

    accelerator = make_accelerator(config)
    device = accelerator.device
    model = build_model(config, curriculum=(0, 0))  # mixing from the first step
    optimizer = build_optimizer(config, model.encoder_q, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    on_accelerator = augment_on_accelerator(config, device)
    photometric = (StepPhotometric(config.img_size, seed=config.seed, rank=0, augmentation=config.augmentation)
                   if on_accelerator else None)
    train_step = TrainStep(
        model=model, moco=accelerator.unwrap_model(model), accelerator=accelerator, optimizer=optimizer,
        scheduler=scheduler, guard=NonFiniteGuard(optimizer, config.max_nonfinite_steps, device=device),
        window=StatsWindow(), bad_images=RunningCount(), momentum_at=momentum_schedule(config),
        clip_grad=config.clip_grad, photometric=photometric, has_labels=True,
    )
    generator = torch.Generator().manual_seed(0)
    B, shape = config.batch_size, (config.batch_size, 3, config.img_size, config.img_size)
    if photometric:
        views = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device) for _ in range(2)]
    else:
        views = [torch.randn(shape, generator=generator).to(device) for _ in range(2)]
    batches = [(torch.arange(B, device=device) + call * B, torch.arange(B, device=device) % 10,
                torch.zeros(B, dtype=torch.long, device=device)) for call in range(calls)]
    model.train()
    done = [0]

    def step() -> None:
        ids, labels, unreadable = batches[done[0]]
        train_step(*views, ids, labels, unreadable, done[0])
        done[0] += 1

    return step, device


def count_row(config, *, warmup: int, measure: int, bare: Optional[Counter] = None) -> dict[str, Any]:
    """The counts of one configuration: bare loop (or `bare`, already counted for its network) and trainer."""
    step, device = trainer_step(config, calls=warmup + measure)
    trainer = ops_per_step(step, warmup=warmup, measure=measure)
    if bare is None:
        bare = ops_per_step(bare_step(config, device), warmup=warmup, measure=measure)
    extra = Counter(trainer)
    extra.subtract(bare)
    bare_total, trainer_total = sum(bare.values()), sum(trainer.values())
    return {
        "arch": config.arch, "bn_splits": config.bn_splits, "bare": bare_total, "trainer": trainer_total,
        "ratio": trainer_total / bare_total, "device": device_description(device),
        "trainer_host_reads": sum(trainer[name] for name in HOST_READS),
        "trainer_extra_by_op": {name: count for name, count in extra.most_common() if count},
        "bare_by_op": dict(bare.most_common()), "trainer_by_op": dict(trainer.most_common()),
        "_bare_counter": bare,
    }


def _comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", type=_comma_list(str), default=None,
                        help="rows: these models, e.g. resnet18,resnet50 (default: the trainer's --arch)")
    parser.add_argument("--splits", type=_comma_list(int), default=None,
                        help="rows: these --bn_splits, e.g. 1,8 (default: the trainer's --bn_splits)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="steps run before counting")
    parser.add_argument("--measure_steps", type=int, default=2, help="steps counted (the mean is reported)")


def run_overhead(args: argparse.Namespace, trainer_argv: Sequence[str]) -> dict[str, Any]:
    """Launches per step of the bare loop and the trainer's step, for each row; a table and the JSON payload."""
    from hnmix.train.components import check_arch
    from hnmix.train.config import parse_config

    base = parse_config([*DEFAULT_TRAIN_OPTIONS, *trainer_argv])
    rows, bare_of = [], {}
    console = Console()
    for arch in args.archs or [base.arch]:
        for splits in args.splits or [base.bn_splits]:
            config = parse_config([*DEFAULT_TRAIN_OPTIONS, *trainer_argv, "--arch", arch, "--bn_splits", str(splits)])
            check_arch(config.arch, config.stem, config.resnet_init)  # an unknown model is one line
            row = count_row(config, warmup=args.warmup_steps, measure=args.measure_steps, bare=bare_of.get(arch))
            bare_of[arch] = row.pop("_bare_counter")
            console.log(f"{arch}, bn_splits {splits}: bare {row['bare']:,.0f}, trainer {row['trainer']:,.0f} "
                        f"({row['ratio']:.2f}x)")
            rows.append(row)
    table = Table(title=f"Kernel launches per step ({RULE}, mean of {args.measure_steps}); {base.img_size} px, "
                        f"batch {base.batch_size}, n_hard {base.n_hard}, s1 {base.s1_hard}, s2 {base.s2_hard}, "
                        f"{base.optimizer}, {base.mixed_precision or 'no'} mixed precision")
    for column in ("model", "bn_splits", "bare loop", "trainer step", "trainer / bare"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(row["arch"], str(row["bn_splits"]), f"{row['bare']:,.0f}", f"{row['trainer']:,.0f}",
                      f"{row['ratio']:.2f}x")
    console.print(table)
    return {"rule": RULE, "warmup_steps": args.warmup_steps, "measured_steps": args.measure_steps, "rows": rows,
            "config": base.to_dict(), "torch": torch.__version__}
