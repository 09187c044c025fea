"""A run's options checked before a launcher starts it: `python -m hnmix.train.preflight
--num_processes N [hnmix.train options]` prints the trainer's one-line error and exits 2, or
exits 0 silently.

Why: when the trainers of a multi-process `accelerate launch` stop on a bad option, torch's
elastic agent reports their exit code 2 as a failure table and exits 1. The launch/ scripts run
this first, so that what a user can get wrong in the options (values, the queue against the
global batch, the architecture, a checkpoint to resume) is one line and exit 2, as with
`python -m hnmix.train`. It reads no data and computes nothing; the trainers check again.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from accelerate import PartialState

from hnmix.errors import HnmixError
from hnmix.train.components import check_arch, console, resolve_lr
from hnmix.train.config import TrainConfig, check_queue_fits_global_batch, parse_config
from hnmix.train.state import checkpoint_to_resume


def check_options(config: TrainConfig, num_processes: int) -> TrainConfig:
    """The checks of `config` that need the number of processes but no data; returns `config` with
    its peak learning rate resolved. The trainer makes them first, and so does `preflight`."""
    check_arch(config.model.arch, config.model.stem, config.model.resnet_init)
    check_queue_fits_global_batch(config, num_processes)
    return resolve_lr(config, num_processes)


def report_error(error: HnmixError) -> None:
    """`hnmix: error: LINE` on stderr, from the first process only."""
    if os.environ.get("RANK", "0") == "0":
        # An error raised in a DataLoader worker arrives with the worker's traceback before it.
        line = str(error).strip().splitlines()[-1]
        console.print(f"hnmix: error: {line}", markup=False, highlight=False, soft_wrap=True)


def preflight(config: TrainConfig, num_processes: int) -> None:
    """Raises the error the trainers would raise for `config` on `num_processes` before any data."""
    config = check_options(config, num_processes)
    checkpoint_to_resume(config, num_processes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnmix.train.preflight", add_help=False)
    parser.add_argument("--num_processes", type=int, required=True)
    known, train_argv = parser.parse_known_args(argv)
    PartialState(cpu=True)  # for the loggers of the checks; the trainers log their findings themselves
    logging.getLogger("hnmix").setLevel(logging.ERROR)
    try:
        preflight(parse_config(train_argv), known.num_processes)
    except HnmixError as error:
        report_error(error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
