"""hnmix.train at sizes that train in seconds on 2 CPU cores, and readers of what a run wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

from launch import REPO

# A tiny real timm model and sizes that train in seconds on 2 CPU cores.
TINY = ["--dataset", "synthetic", "--synthetic_size", "64", "-a", "test_resnet", "-i", "32", "-bs", "8",
        "-dm", "16", "-km", "64", "-nh", "8", "-s1h", "4", "-s2h", "4", "-st1h", "0", "-st2h", "1"]


def run_train(*args, timeout=300, env_extra=None, **popen):
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "hnmix.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(dir_out: Path) -> list[dict]:
    return [json.loads(line) for line in (dir_out / "metrics.jsonl").read_text().splitlines()]


def losses(dir_out: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in metrics(dir_out)}


def checkpoints(dir_out: Path) -> list[str]:
    return sorted(p.name for p in (dir_out / "checkpoints").iterdir())
