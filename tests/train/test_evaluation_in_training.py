"""The kNN monitor inside a run never costs training: a failing evaluation is one warning and a
record, the final checkpoint and export come before the final evaluation, and images/s counts
training time only."""

import time
from types import SimpleNamespace

from huggingface_hub import ModelCard

import hnmix.train.loop
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.train.config import parse_config
from hnmix.train.loop import train
from tiny_run import TINY, checkpoints, metrics

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
    monkeypatch.setattr(KnnMonitor, "evaluate", lambda self, backbone, accelerator: {"knn_top1": 42.5, "knn_top5": 90.0})
    assert train(parse_config([*RUN, "-do", str(tmp_path)])) == 0
    last = metrics(tmp_path)[-1]
    assert last["step"] == 4 and last["knn_top1"] == 42.5 and "loss" in last
    assert "42.50" in ModelCard.load(tmp_path / "encoder/README.md").text


def test_images_per_s_leaves_the_evaluation_time_out(tmp_path, monkeypatch):
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
                               "-do", str(tmp_path)])) == 0
    [record] = [r for r in metrics(tmp_path) if "images_per_s" in r]
    # 4 steps of 8 images in a few ms of (fake) training time; counting the 1000 s would give < 0.04.
    assert record["images_per_s"] > 100


def test_a_held_out_count_trains_with_the_knn_monitor(tmp_path):
    # --eval_split_size 16 (a count, parsed as the float 16.0) once stopped the monitor's start-up.
    assert train(parse_config([*TINY, "-s", "2", "-sp", "2", "--num_workers", "0", "--eval_every", "2",
                               "--eval_split_size", "16", "-do", str(tmp_path)])) == 0
    assert "knn_top1" in metrics(tmp_path)[-1]
