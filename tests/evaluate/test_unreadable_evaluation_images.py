"""Unreadable images in the evaluation splits are skipped and counted, never the end of an
evaluation or of the training that runs one."""

import json
import subprocess
import sys

from data_images import write_folder_with_corrupt_files
from launch import REPO
from tiny_run import TINY, checkpoints, metrics, run_train


def test_a_run_on_a_folder_with_corrupt_files_ends_with_its_checkpoint_encoder_and_knn(tmp_path):
    data = write_folder_with_corrupt_files(tmp_path / "images", good=76, corrupt=4)  # 5%
    out = tmp_path / "out"
    result = run_train(*TINY[2:], "--dataset", str(data), "-s", "20", "-sp", "10", "-ss", "10", "--num_workers", "0",
                       "--eval_every", "10", "-do", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints(out) == ["step_00000010", "step_00000020"] and (out / "encoder/model.safetensors").exists()
    for record in metrics(out):
        assert "knn_top1" in record
        assert record["eval_bad_samples"] == 4  # each corrupt file lies in the bank or the held-out part, once
    assert "skipped in the evaluation" in " ".join(result.stderr.split())


def test_evaluate_skips_counts_and_names_every_unreadable_image_in_one_run(tmp_path):
    data = write_folder_with_corrupt_files(tmp_path / "images", good=38, corrupt=3)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "hnmix.evaluate", "test_resnet", "--dataset", str(data), "-i", "32",
                           "--num_workers", "0", "--json", str(report)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(report.read_text())["eval_bad_samples"] == 3
    stderr = " ".join(done.stderr.split())
    assert all(f"truncated_{i}.jpg" in stderr for i in range(3))
