"""python -m hnmix.evaluate starts no more DataLoader workers than the machine has cores."""

import os

from hnmix.evaluate.cli import build_parser


def test_the_default_workers_are_at_most_the_cores_and_at_most_four():
    cores = len(os.sched_getaffinity(0))
    assert build_parser().parse_args(["resnet18"]).num_workers == max(1, min(4, cores))
    assert build_parser().parse_args(["resnet18", "--num_workers", "3"]).num_workers == 3
