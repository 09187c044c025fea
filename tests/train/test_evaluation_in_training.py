"""The kNN monitor inside a run never costs training: a failing evaluation is one warning and a
record, the final checkpoint and export come before the final evaluation, and images/s counts
training time only."""

import time
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from tiny_run import TINY, checkpoints, metrics

import hnmix.train.loop
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.train.config import parse_config
from hnmix.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = [*TINY, "-s", "4", "-sp", "2", "-ss", "100", "--num_workers", "0", "--eval_every", "2"]


def test_a_failing_evaluation_is_recorded_and_the_run_ends_with_its_checkpoint_and_encoder(tmp_path, monkeypatch):
    calls = []

    def failing(self, backbone, accelerator):
        calls.append((tmp_path / "checkpoints").exists() and checkpoints(tmp_path))
        raise OSError("image 17 of the validation split cannot be read")

    monkeypatch.setattr(KnnMonitor, "evaluate", failing)
    assert train(parse_config([*RUN, "-do", str(tmp_path)])) == 0
    assert checkpoints(tmp_path) == ["step_00000004"] and (tmp_path / "encoder/model.safetensors").exists()
    # The final evaluation ran after the final checkpoint was saved.
    assert calls == [False, ["step_00000004"]]
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert "cannot be read" in record["knn_error"] and "loss" in record


def test_the_final_evaluation_reaches_the_last_record_and_the_model_card(tmp_path, monkeypatch):
    results = iter([{"knn_top1": 11.25, "knn_top5": 33.75}, {"knn_top1": 42.5, "knn_top5": 90.0}])  # steps 2, 4
    monkeypatch.setattr(KnnMonitor, "evaluate", lambda self, backbone, accelerator: next(results))
    assert train(parse_config([*RUN, "-do", str(tmp_path)])) == 0
    records = metrics(tmp_path)
    assert records[0]["step"] == 2 and records[0]["knn_top1"] == 11.25
    last = records[-1]
    assert last["step"] == 4 and last["knn_top1"] == 42.5 and "loss" in last
    card = ModelCard.load(tmp_path / "encoder/README.md").text
    assert "| 42.50 | 90.00 |" in card and "11.25" not in card  # the final kNN, not the one of step 2


def test_a_dataset_without_labels_trains_without_the_knn_monitor(tmp_path, capfd, monkeypatch):
    """An image column and nothing else (a save_to_disk directory): the run trains to the end,
    says once that it has no monitor, and logs no kNN and no false-negative statistic."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(32)]
    data = tmp_path / "unlabelled"
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(data)
    out = tmp_path / "out"
    monkeypatch.setattr(hnmix.train.loop, "refresh_curves", lambda dir_out: None)  # no pictures: CI time
    assert train(parse_config([*TINY[2:], "--dataset", str(data), "-s", "4", "-sp", "2", "-ss", "100",
                               "--num_workers", "0", "--eval_every", "2", "-do", str(out)])) == 0
    assert "The dataset has no labels: training without the kNN monitor" in " ".join(capfd.readouterr().err.split())
    records = metrics(out)
    assert [r["step"] for r in records] == [2, 4] and all("loss" in r for r in records)
    assert not {key for r in records for key in r if key.startswith("knn") or key == "hard_false_negative"}
    assert checkpoints(out) == ["step_00000004"] and "| kNN" not in ModelCard.load(out / "encoder/README.md").text


@pytest.mark.parametrize("at_start", [[], ["--eval_at_start"]], ids=["during", "at_start_too"])
def test_images_per_s_leaves_the_evaluation_time_out(tmp_path, monkeypatch, at_start):
    clock = SimpleNamespace(now=0.0)

    def perf_counter():
        clock.now += 0.001  # every reading of the trainer's clock: 1 ms of training
        return clock.now

    def slow_evaluation(self, backbone, accelerator):
        clock.now += 1000.0  # an evaluation that takes 1000 s
        return {"knn_top1": 1.0, "knn_top5": 5.0}

    monkeypatch.setattr(hnmix.train.loop, "time", SimpleNamespace(perf_counter=perf_counter, monotonic=time.monotonic))
    monkeypatch.setattr(KnnMonitor, "evaluate", slow_evaluation)
    assert train(parse_config([*TINY, "-s", "4", "-sp", "4", "-ss", "100", "--num_workers", "0", "--eval_every", "2",
                               "-do", str(tmp_path), *at_start])) == 0
    [record] = [r for r in metrics(tmp_path) if "images_per_s" in r]
    # 4 steps of 8 images in a few ms of (fake) training time; counting the 1000 s would give < 0.04.
    assert record["images_per_s"] > 100


def test_a_held_out_count_trains_with_the_knn_monitor(tmp_path):
    # --eval_split_size 16 (a count, parsed as the float 16.0) once stopped the monitor's start-up.
    assert train(parse_config([*TINY, "-s", "2", "-sp", "2", "--num_workers", "0", "--eval_every", "2",
                               "--eval_split_size", "16", "-do", str(tmp_path)])) == 0
    assert "knn_top1" in metrics(tmp_path)[-1]


def test_eval_at_start_records_the_untrained_network_at_step_0_and_a_resume_does_not_repeat_it(tmp_path):
    assert train(parse_config([*RUN, "--eval_at_start", "--stop_at", "2", "-do", str(tmp_path)])) == 0
    first = metrics(tmp_path)[0]
    assert first["step"] == 0 and "knn_top1" in first and "loss" not in first
    assert train(parse_config([*RUN, "--eval_at_start", "-do", str(tmp_path), "--resume", "latest"])) == 0
    assert [r["step"] for r in metrics(tmp_path)].count(0) == 1
