"""What a person reads: one short log line per record, the end-of-run table, bounded warnings."""

import logging
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_images import write_folder_with_corrupt_files
from tiny_run import TINY, metrics, run_train

from hnmix.data.two_views import WARNINGS_PER_DATASET
from hnmix.train.log_lines import (
    LINE_WIDTH,
    MESSAGE_WIDTH,
    DropRankTag,
    format_details,
    format_record,
    tracker_locations,
)

STEP_LINE = re.compile(r"INFO +step (\d+)/(\d+)  ")


def test_a_record_line_leads_with_step_loss_lr_acc1_and_knn_and_fits_the_message_width():
    record = {"step": 250000, "epoch": 1234, "loss": 10.12345, "lr": 1.5e-3, "images_per_s": 123456.7,
              "acc1": 1.0, "knn_top1": 100.0, "knn_top5": 100.0, "logit_pos": 12.5, "hard_false_negative": 0.25}
    line = format_record(record, 250000)
    assert len(line) <= MESSAGE_WIDTH, line
    assert line == "step 250000/250000  loss 10.1235  lr 1.50e-03  acc1 100.0%  kNN 100.0/100.0%  123457 img/s"
    assert "epoch 1234" in format_details(record) and "logit_pos 12.5" in format_details(record)
    troubled = format_record(record | {"bad_samples": 12, "skipped_steps": 3}, 250000)
    assert troubled.endswith("img/s  bad 12  skipped 3")
    quiet = format_record({"step": 5, "epoch": 0, "loss": 1.0, "lr": 1e-4, "bad_samples": 0, "skipped_steps": 0}, 10)
    assert "bad" not in quiet and "skipped" not in quiet  # only when there are any


@pytest.fixture
def short_tmp_path():
    """A scratch folder with a short path (pytest-xdist's tmp_path is 10 characters longer)."""
    path = Path(tempfile.mkdtemp(prefix="hnmix-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_default_run_logs_one_line_per_record_within_120_columns_and_ends_with_a_table(short_tmp_path):
    out = short_tmp_path / "out"  # the summary table's paths fit its 120 columns unwrapped
    result = run_train(*TINY, "-s", "6", "-sp", "2", "-ss", "3", "--eval_every", "3", "--num_workers", "1",
                       "-do", str(out), env_extra={"COLUMNS": str(LINE_WIDTH)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert all(len(line.rstrip()) <= LINE_WIDTH for line in lines), max(lines, key=lambda x: len(x.rstrip()))
    step_lines = [line for line in lines if STEP_LINE.search(line)]
    records = metrics(out)
    assert [int(STEP_LINE.search(line).group(1)) for line in step_lines] == [r["step"] for r in records]
    for line, record in zip(step_lines, records):  # the whole record on its one line
        assert ("loss " in line and "lr " in line and "acc1 " in line and "img/s" in line) == ("loss" in record)
        assert ("kNN " in line) == ("knn_top1" in record)
    assert {"loss", "knn_top1"} <= set(records[-1])  # the last line has both
    assert "[RANK" not in result.stderr
    assert result.stderr.count("dataset synthetic split train:") == 1
    assert result.stderr.count("No shuffle BN") == 1  # test_resnet has BatchNorm, one process, --bn_splits 1
    table = result.stderr[result.stderr.index("hnmix.train: done"):]
    for row in ("steps", "6 of 6", "wall time", "mean images/s", "final loss", "kNN top-1 / top-5",
                str(out / "curves.png"), str(out / "encoder"), str(out / "checkpoints/step_00000006")):
        assert row in table, row


def test_unreadable_images_are_warned_about_a_bounded_number_of_times_over_all_workers(tmp_path):
    data = write_folder_with_corrupt_files(tmp_path / "images", good=24, corrupt=24)
    result = run_train(*TINY[2:], "--dataset", str(data), "-s", "6", "-sp", "3", "-ss", "6", "--num_workers", "2",
                       "--eval_every", "0", "--max_bad_fraction", "1", "-do", str(tmp_path / "out"),
                       env_extra={"COLUMNS": "400"})  # one line per warning
    assert result.returncode == 0, result.stderr[-3000:]
    warned = result.stderr.count("using image")
    # Two workers may pass the limit at the same instant: one more at the most.
    assert 1 <= warned <= WARNINGS_PER_DATASET + 1, result.stderr[-3000:]
    assert metrics(tmp_path / "out")[-1]["bad_samples"] > WARNINGS_PER_DATASET + 1  # the rest are counted


def test_the_trackers_line_says_where_each_writes():
    accelerator = SimpleNamespace(trackers=[
        SimpleNamespace(name="tensorboard", logging_dir="out/hnmix"),
        SimpleNamespace(name="wandb", run=SimpleNamespace(url="https://wandb.ai/me/hnmix/runs/1")),
        SimpleNamespace(name="mlflow")])
    assert tracker_locations(accelerator) == [
        "tensorboard to out/hnmix (view it with: tensorboard --logdir out/hnmix)",
        "wandb to https://wandb.ai/me/hnmix/runs/1", "mlflow (its own default location)"]


def test_the_rank_tag_goes_on_one_process():
    record = logging.LogRecord("hnmix", logging.INFO, __file__, 1, "[RANK 0] step 5/10  loss 1.0", None, None)
    assert DropRankTag().filter(record) and record.getMessage() == "step 5/10  loss 1.0"
