"""Run under `accelerate launch --num_processes 2`: the trainer's kNN monitor when rank 1's feature
extraction fails (a fault injected here, in the dataset of rank 1 only, not in the library).

Through the trainer's own `evaluate_without_stopping`, three evaluations in a row:
1. rank 1's dataset raises a RuntimeError in its second batch of the bank (after a gather);
2. rank 1's dataset raises a DataError (a user's error) in the queries;
3. nothing fails.
The process group's timeout is 60 s: a rank that waited for the failed one would time out instead
of reporting rank 1. Writes OUT/rank{R}.json: the world size, each evaluation's record and
seconds, and whether a sum over the ranks after them still lines up.
"""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.errors import DataError
from hnmix.evaluate.features import EvalImages, make_eval_loader
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.train.loop import evaluate_without_stopping

SIZE, BATCH, IMG = 24, 4, 32
FAULT = {"bank": None, "queries": None}  # the exception rank 1's split raises, per evaluation


class FailingOnRank1(EvalImages):
    """EvalImages whose rows 12 and later raise FAULT[split] on rank 1 (its second batch of 4)."""

    def __init__(self, dataset, split: str):
        super().__init__(dataset, image_column="image", label_column="label", img_size=IMG)
        self.split = split

    def __getitem__(self, index):
        fault = FAULT[self.split]
        if fault is not None and os.environ.get("RANK") == "1" and int(index) >= 12:
            raise fault
        return super().__getitem__(index)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    torch.manual_seed(0)
    moco = SimpleNamespace(encoder_q=SimpleNamespace(backbone=timm.create_model("test_resnet", num_classes=0)))
    loaders = [make_eval_loader(FailingOnRank1(make_synthetic_dataset(SIZE, seed=seed, image_size=IMG), split),
                                batch_size=BATCH, num_workers=0)
               for seed, split in enumerate(("bank", "queries"))]
    monitor = KnnMonitor(*accelerator.prepare(*loaders), num_classes=10, k=5)

    faults = [{"bank": RuntimeError("injected failure in rank 1's dataset"), "queries": None},
              {"bank": None, "queries": DataError("image 13 cannot be decoded (injected); remove or replace it")},
              {"bank": None, "queries": None}]
    records, seconds = [], []
    for step, fault in enumerate(faults, start=1):
        FAULT.update(fault)
        started = time.perf_counter()
        records.append(evaluate_without_stopping(monitor, moco, accelerator, step))
        seconds.append(time.perf_counter() - started)
    ranks = accelerator.reduce(torch.ones(1), reduction="sum").item()  # the collectives still line up
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "records": records,
              "seconds": seconds, "ranks_after": ranks}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
