"""Benchmarks of hnmix, run as a module.

`python -m hnmix.bench mixing|train|data|overhead|learn [options]`, one module of this package
each; `python -m hnmix.bench COMMAND --help` lists a command's options. The GPU check
(`launch/gpu_check.sh`, `python -m tools.gpu_check`) runs them at the paper's sizes with the
CUDA tests, in one call.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from hnmix.bench.data import run_data, worker_counts
from hnmix.bench.learn import run_learn
from hnmix.bench.mixing import DTYPES, VARIANTS, run_mixing, run_mixing_peak
from hnmix.bench.overhead import add_arguments as add_overhead_arguments
from hnmix.bench.overhead import run_overhead
from hnmix.bench.system import write_json
from hnmix.bench.train import run_train
from hnmix.mixing import NEGATIVE_TYPES

MIXING_SIZES = {"s1": 1024, "s2": 512}  # the default count of a type by its size keyword; 0 for the others


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mixing_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch", type=int, default=256, help="B, queries per step")
    p.add_argument("--queue", type=int, default=65536, help="K, queue size")
    p.add_argument("--dim", type=int, default=128, help="d, embedding size")
    p.add_argument("--n_hard", type=int, default=1024, help="hard negatives per query")
    for t in NEGATIVE_TYPES.values():
        p.add_argument(f"--{t.size}", type=int, default=MIXING_SIZES.get(t.size, 0),
                       help=f"{t.label} synthetic negatives per query")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--device", default=_default_device())
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of q and k")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    mixing.add_argument("--no_peak", action="store_true",
                        help="skip the peak-memory measurement (on the CPU it starts a fresh interpreter per variant)")
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
    data.add_argument("--max_workers", type=int, default=os.cpu_count() or 1, help="measure 1..W workers")
    data.add_argument("--workers", type=worker_counts, default=None,
                      help="the worker counts to measure instead, e.g. 1,4,16")
    data.add_argument("--img_size", type=int, default=None, help="view size (default: --config's, else 224)")
    data.add_argument("--jpeg_size", default=None, help="WxH of every generated JPEG, e.g. 768x512 (default: varied)")
    data.add_argument("--images", type=int, default=256, help="generated JPEGs when no --dataset is given")
    data.add_argument("--dataset", default=None, help="a dataset as hnmix.train takes it, instead of generated JPEGs")
    data.add_argument("--split", default="train", help="the split of --dataset")
    data.add_argument("--config", default=None,
                      help="a recipe (YAML): its img_size, image_column and augmentation options")
    data.add_argument("--in_memory_gib", type=float, default=1.0,
                      help="budget of the kept-in-memory rows, as hnmix.train's --images_in_memory_gib (0: skip them)")
    data.add_argument("--batches", type=int, default=8, help="batches measured per worker count")
    data.add_argument("--batch_size", type=int, default=32, help="the DataLoader's batch")
    data.add_argument("--photometric_batch_size", type=int, default=None,
                      help="images per view of the batched photometric row (default: --batch_size)")
    data.add_argument("--device", default=_default_device(), help="device of the batched photometric row")
    data.add_argument("--repeats", type=int, default=3, help="timed batches of the batched photometric row")
    data.add_argument("--lincls", action="store_true",
                      help="also measure the training loader of hnmix.evaluate --protocol lincls (one crop per image)")
    data.set_defaults(func=run_data)
    overhead = commands.add_parser(
        "overhead", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="kernel launches per step of the bare loop and the trainer's step, counted on the CPU; options it "
             "does not know go to hnmix.train (default: 32 px, batch 16, SGD, MoCHi on)",
    )
    add_overhead_arguments(overhead)
    overhead.set_defaults(func=run_overhead)
    learn = commands.add_parser(
        "learn", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train plain MoCo and MoCHi alike, evaluate both next to the untrained network (kNN, linear "
             "probe); options it does not know go to hnmix.train (default: a small recipe on synthetic-hard)",
    )
    learn.add_argument("--seeds", type=_positive_int, default=1, help="seeds per arm (mean and spread)")
    learn.set_defaults(func=run_learn)
    # Hidden (no help=): the CPU peak-memory measurement of one variant in a fresh process.
    peak = commands.add_parser("_mixing_peak", parents=[_mixing_options()])
    peak.add_argument("--variant", choices=VARIANTS, required=True)
    peak.set_defaults(func=run_mixing_peak)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.func in (run_train, run_learn, run_overhead):  # these pass the options they do not know to hnmix.train
        payload = args.func(args, rest)
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        payload = args.func(args)
    if payload is not None and getattr(args, "json", None) is not None:
        write_json(args.json, payload)
    return 0
