"""Run under `accelerate launch --num_processes 2`: `python -m hnmix.evaluate --protocol lincls` on 2 ranks.

Writes OUT/rank{R}.json: the world size and the report `run_evaluation` returned on that rank
(the main process also writes OUT/report.json and the classifier under OUT/lincls). 37 test
images are not a multiple of 2 processes x batch 4, so Accelerate pads the last evaluation batch.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from hnmix.evaluate.cli import build_parser, run_evaluation

SIZE = 37
CLI_ARGS = ["test_resnet", "--protocol", "lincls", "--dataset", "synthetic", "--synthetic_size", str(SIZE),
            "-i", "32", "--batch_size", "4", "--num_workers", "0", "--seed", "0", "--lincls_epochs", "2",
            "--lincls_batch_size", "8", "--lincls_lr", "1.0"]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    args = build_parser().parse_args([*CLI_ARGS, "--lincls_dir", str(out / "lincls"), "--json", str(out / "report.json")])
    report = run_evaluation(args)
    state = PartialState()
    (out / f"rank{state.process_index}.json").write_text(json.dumps({"world": state.num_processes, "report": report}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
