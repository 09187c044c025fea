"""hnmix.train under `accelerate launch`, where every rank also writes the statistics it adds to
the logging window at each step, as RANK_STATS_DIR/rank{R}.jsonl (recorded here, not in the
library): what the records of metrics.jsonl must average over steps and processes."""

import json
import os
import sys
from pathlib import Path

from hnmix.train import metrics
from hnmix.train.loop import main

real_add = metrics.StatsWindow.add
steps = 0


def recording_add(self, stats, applied=None):
    global steps
    steps += 1
    path = Path(os.environ["RANK_STATS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    with path.open("a") as file:
        file.write(json.dumps({"step": steps} | {name: value.item() for name, value in stats.items()}) + "\n")
    return real_add(self, stats, applied)


if __name__ == "__main__":
    metrics.StatsWindow.add = recording_add
    sys.exit(main(sys.argv[1:]))
