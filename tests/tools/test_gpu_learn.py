"""launch/gpu_learn.sh cannot rot: its dry run trains both CIFAR-10 recipes on a tiny copy laid out
like uoft-cs/cifar10, on the CPU, and writes the table beside the published curve."""

import json
import os
import subprocess
import sys

import pytest
from data_images import write_cifar10_like_repo

from launch import REPO
from tools.gpu_learn import comparison_rows, summarise

pytestmark = pytest.mark.multiprocess


def test_the_dry_run_trains_both_arms_with_a_knn_after_every_epoch(tmp_path):
    data = write_cifar10_like_repo(tmp_path / "cifar10", {"train": 32, "test": 20})
    out = tmp_path / "out"
    done = subprocess.run(["bash", "launch/gpu_learn.sh", "--dry-run", str(data), str(out)], cwd=REPO,
                          env=os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_learn.json").read_text())
    for arm in ("moco", "mochi"):
        result = report["arms"][arm]
        # 32 images at batch 16: 2 steps per epoch, 4 steps: a kNN after epochs 1 and 2.
        assert sorted(map(int, result["knn_top1_by_epoch"])) == [1, 2], result
        assert result["images_per_s"] > 0
        assert not (out / arm / "checkpoints").exists()  # what comes back from the device stays small
    assert [row["epoch"] for row in report["rows"]] == [0, 1, 2]
    assert report["rows"][0]["moco"] is not None  # the untrained network, measured the same way
    assert report["rows"][1]["published"] == 31.98
    table = (out / "gpu_learn.md").read_text()
    assert "| 1 | 31.98 |" in table and "hnmix mochi" in table


def test_the_summary_reads_epochs_throughput_and_memory():
    records = [{"step": 0, "epoch": 0, "knn_top1": 12.0},
               {"step": 4, "epoch": 0, "images_per_s": 10.0, "knn_top1": 20.0, "memory_peak_gib": 1.0},
               {"step": 8, "epoch": 1, "images_per_s": 30.0, "knn_top1": 25.0, "memory_peak_gib": 1.5}]
    summary = summarise(records, wall_s=12.0)
    assert summary["knn_top1_by_epoch"] == {1: 20.0, 2: 25.0} and summary["knn_top1_untrained"] == 12.0
    assert summary["images_per_s"] == 30.0  # the first window holds the start-up
    assert summary["memory_peak_gib"] == 1.5 and summary["epochs"] == 2 and summary["steps"] == 8
    rows = comparison_rows({"moco": summary}, {1: 31.98, 2: 33.52})
    assert rows[0] == {"epoch": 0, "published": None, "moco": 12.0}
    assert rows[2] == {"epoch": 2, "published": 33.52, "moco": 25.0, "moco_minus_published": -8.52}
