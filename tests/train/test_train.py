"""hnmix.train end to end on CPU: outputs, 2 real processes, exact resume, bad options."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from data_images import write_folder_with_corrupt_files
from PIL import Image
from safetensors.torch import load_file
from tiny_run import TINY, checkpoints, losses, metrics, run_train

from launch import REPO, accelerate_launch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the runs in this process: tiny convolutions


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """12 uninterrupted steps, a record every step, a checkpoint every 4."""
    dir_out = tmp_path_factory.mktemp("straight")
    result = run_train(*TINY, "-s", "12", "-sp", "1", "-ss", "4", "--num_workers", "2", "-do", str(dir_out))
    assert result.returncode == 0, result.stderr[-3000:]
    return dir_out


def test_a_run_writes_checkpoints_metrics_config_and_a_timm_encoder(straight_run):
    assert checkpoints(straight_run) == ["step_00000004", "step_00000008", "step_00000012"]
    final = straight_run / "checkpoints/step_00000012"
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json",
            "config.yaml"} <= {p.name for p in final.iterdir()}
    weights = load_file(final / "model.safetensors")
    assert weights["queue.ptr"].item() == 12 * 8 % 64
    assert weights["queue.keys"].shape == (64, 16)
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 12

    records = metrics(straight_run)
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("epoch", "loss", "lr", "images_per_s", "acc1", "logit_pos", "logit_hardest", "hard_false_negative"):
        assert all(key in r for r in records), key
    assert "logit_type2" not in records[0] and "logit_type2" in records[1]  # curriculum: type 2 from step 1 (0-based)
    assert records[-1]["epoch"] == 1  # 64 images / batch 8 = 8 steps per epoch
    # The kNN monitor ran at the end (eval_every 1000 > steps) on the held-out part of synthetic.
    assert 0 <= records[-1]["knn_top1"] <= records[-1]["knn_top5"] <= 100
    assert all("knn_top1" not in r for r in records[:-1])

    encoder = timm.create_model(f"local-dir:{straight_run / 'encoder'}", pretrained=True).eval()
    trained = timm.create_model("test_resnet", num_classes=0).eval()
    backbone = {k.removeprefix("encoder_q.backbone."): v for k, v in weights.items() if k.startswith("encoder_q.backbone.")}
    trained.load_state_dict(backbone)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(x), trained(x), rtol=0, atol=1e-6)


def resume_from(run: Path, step: int, dir_out: Path) -> None:
    """`dir_out` as `run` stood at its checkpoint of `step`: that checkpoint and its records (the
    records after `step` go on resume), for a resume that is to continue `run` exactly."""
    name = f"step_{step:08d}"
    shutil.copytree(run / "checkpoints" / name, dir_out / "checkpoints" / name)
    shutil.copy(run / "metrics.jsonl", dir_out)


def test_resume_continues_with_identical_losses(straight_run, tmp_path):
    # The straight run's checkpoint of step 4 (written with 2 DataLoader workers) resumed with
    # another number of workers: the views do not depend on it.
    resume_from(straight_run, 4, tmp_path)
    second = run_train(*TINY, "-s", "12", "-sp", "1", "-ss", "100", "--num_workers", "1", "-do", str(tmp_path),
                       "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(tmp_path) == losses(straight_run)
    assert [r["lr"] for r in metrics(tmp_path)] == [r["lr"] for r in metrics(straight_run)]


def test_photometric_augmentation_on_the_accelerator_trains_and_resumes_exactly(tmp_path):
    """--augment_device accelerator (here the CPU): the workers deliver uint8 crops, the trainer
    jitters, greys, blurs and normalises them batched, with parameters seeded by (seed, step,
    rank): a resumed run redraws them, so its losses are those of the uninterrupted run."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    options = [*TINY, "-s", "6", "-sp", "1", "-ss", "3", "--eval_every", "0", "--augment_device", "accelerator"]
    result = run_train(*options, "--num_workers", "1", "-do", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "photometric augmentation on the accelerator" in " ".join(result.stderr.split())  # rich wraps lines
    resume_from(straight, 3, halves)  # its checkpoint of step 3, resumed without workers
    second = run_train(*options, "--num_workers", "0", "-do", str(halves), "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(losses(straight)) == 6 and losses(halves) == losses(straight)


def test_compiled_and_eager_runs_resume_each_others_checkpoints_and_continue_the_eager_run(straight_run, tmp_path):
    """--compile compiles the encoders in place, so a checkpoint holds the eager state dict: a
    compiled run resumes the eager run's step 4 for two steps, an eager run resumes that for two
    more, and both continue the uninterrupted eager run (to the rounding of inductor's kernels)."""
    from hnmix.train.config import parse_config
    from hnmix.train.loop import train

    shutil.copytree(straight_run / "checkpoints/step_00000004", tmp_path / "checkpoints/step_00000004")
    shutil.copy(straight_run / "metrics.jsonl", tmp_path)  # the records after step 4 go on resume
    common = [*TINY, "-s", "12", "-sp", "1", "-ss", "100", "--num_workers", "0", "--eval_every", "0", "-do",
              str(tmp_path), "--resume", "latest"]
    compiled = run_train(*common, "--stop_at", "6", "--compile", timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert checkpoints(tmp_path) == ["step_00000004", "step_00000006"]
    assert train(parse_config([*common, "--stop_at", "8"])) == 0
    expected, resumed = losses(straight_run), losses(tmp_path)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)], rel=1e-4)
    eager = load_file(straight_run / "checkpoints/step_00000008/model.safetensors")
    again = load_file(tmp_path / "checkpoints/step_00000008/model.safetensors")
    assert again.keys() == eager.keys()
    assert torch.equal(again["queue.ids"], eager["queue.ids"]) and again["queue.ptr"] == eager["queue.ptr"]
    for name, value in eager.items():
        torch.testing.assert_close(again[name], value, rtol=1e-3, atol=1e-5, msg=name)


def test_sigkill_mid_run_then_resume_latest_logs_the_same_losses(straight_run, tmp_path):
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hnmix.train", *TINY, "-s", "12", "-sp", "1", "-ss", "4",
                                "--num_workers", "0", "-do", str(tmp_path)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (tmp_path / "checkpoints/step_00000004").exists():
        time.sleep(0.05)
    while time.monotonic() < deadline and len(metrics(tmp_path)) < 6:  # mid-way past the checkpoint
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints(tmp_path)[-1] in ("step_00000004", "step_00000008")
    resumed = run_train(*TINY, "-s", "12", "-sp", "1", "-ss", "4", "--num_workers", "0", "-do", str(tmp_path),
                        "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path) == losses(straight_run)
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 13))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """6 steps on 2 real processes (a record every 2 steps, a checkpoint every 3), each rank also
    writing the statistics it added to the logging window at every step (rank{R}.jsonl)."""
    root = tmp_path_factory.mktemp("two_processes")
    dir_out, per_rank = root / "out", root / "per_rank"
    per_rank.mkdir()
    result = accelerate_launch([str(REPO / "tests/multiprocess/recording_ranks.py"), *TINY, "-bs", "4", "-s", "6",
                                "-sp", "2", "-ss", "3", "--num_workers", "1", "--augment_device", "accelerator",
                                "-do", str(dir_out)], env={"RANK_STATS_DIR": str(per_rank)})
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stderr.txt").write_text(result.stderr)
    return dir_out, per_rank


def test_two_real_processes_share_one_queue(two_processes):
    tmp_path, _ = two_processes
    state = json.loads((tmp_path / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["num_processes"] == 2
    first, second = state["queue_sha256_per_rank"]
    assert first == second
    weights = load_file(tmp_path / "checkpoints/step_00000006/model.safetensors")
    global_batch = 2 * 4
    assert weights["queue.ptr"].item() == 6 * global_batch % 64
    ids = weights["queue.ids"][: 6 * global_batch]
    assert ids.unique().numel() == 6 * global_batch  # 6 steps of one epoch: every image once
    assert [r["step"] for r in metrics(tmp_path)] == [2, 4, 6]
    assert (tmp_path / "encoder/model.safetensors").exists()


def test_two_processes_shuffle_bn_across_ranks_without_a_warning(two_processes):
    dir_out, _ = two_processes
    stderr = (dir_out.parent / "stderr.txt").read_text()
    assert "Trackers" in stderr or "hnmix.train: done" in stderr  # the log is there
    assert "No shuffle BN" not in stderr


def test_each_record_is_the_mean_of_its_steps_statistics_over_both_processes(two_processes):
    dir_out, per_rank = two_processes
    ranks = [{r["step"]: r for r in map(json.loads, (per_rank / f"rank{rank}.jsonl").read_text().splitlines())}
             for rank in (0, 1)]
    assert [sorted(steps) for steps in ranks] == [list(range(1, 7))] * 2
    records = metrics(dir_out)
    names = set().union(*ranks[0].values()) - {"step"}  # logit_type2 from the second step on
    assert {"loss", "acc1", "logit_pos", "logit_hardest", "logit_type1", "logit_type2"} <= names
    for record in records:
        window = (record["step"] - 1, record["step"])
        for name in names:
            values = [steps[s][name] for steps in ranks for s in window if name in steps[s]]
            assert record[name] == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-7), (record["step"], name)
    # The ranks saw other images: rank 0's mean alone would not be the record.
    rank0 = [(ranks[0][r["step"] - 1]["loss"] + ranks[0][r["step"]]["loss"]) / 2 for r in records]
    assert all(abs(mean - r["loss"]) > 1e-4 for mean, r in zip(rank0, records))


def test_image_folder_with_unusual_modes_trains(tmp_path):
    data = tmp_path / "images"
    gradient16 = np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (36, 1))
    for label in ("cats", "dogs"):
        (data / label).mkdir(parents=True)
        for copy in range(2):
            rgb = Image.new("RGB", (40, 36), (200, 100, 30 * copy))
            rgb.convert("L").save(data / label / f"gray_{copy}.png")
            rgb.convert("CMYK").save(data / label / f"cmyk_{copy}.jpg")
            rgb.convert("RGBA").save(data / label / f"rgba_{copy}.png")
            rgb.convert("P").save(data / label / f"palette_{copy}.png")
            Image.fromarray(gradient16).save(data / label / f"sixteen_bit_{copy}.png")
    result = run_train(*TINY[2:], "--dataset", str(data), "-s", "2", "-sp", "1", "-ss", "2", "--num_workers", "0",
                       "-do", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["-km", "60"], "k_moco=60 must be a multiple of the global batch 8"),
        (["-a", "resnet_does_not_exist"], "unknown timm model"),
        (["--dataset", "/nonexistent/images"], "/nonexistent/images does not exist"),
        (["-nh", "65"], "n_hard must be <= k_moco=64"),
        (["--resume", "latest"], "no complete checkpoint"),
    ],
)
def test_bad_options_exit_non_zero_with_one_line_before_training(tmp_path, capfd, args, message):
    """Through the command line's main() in this process (an exception would fail the test):
    `python -m hnmix.train` is sys.exit(main()), which the unwritable dir_out's test runs for real."""
    from hnmix.train.loop import main

    assert main([*TINY, "-s", "2", "-do", str(tmp_path / "out"), *args]) == 2
    stderr = capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("hnmix: error:") and message in lines[-1], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out/checkpoints").exists()


def test_unwritable_dir_out_exits_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_train(*TINY, "-s", "2", "-do", str(blocker / "out"), timeout=120)
    assert result.returncode == 2
    assert "dir_out" in result.stderr and "not writable" in result.stderr and "Traceback" not in result.stderr


def test_report_to_names_trackers_that_accelerate_knows_and_finds_installed():
    from accelerate.tracking import get_available_trackers

    from hnmix.errors import ConfigError
    from hnmix.train.components import requested_trackers

    assert requested_trackers("none") == [] and requested_trackers("all") == ["all"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        requested_trackers("tensorbored")
    if "tensorboard" not in {str(t) for t in get_available_trackers()}:
        with pytest.raises(ConfigError, match="'tensorboard' is not installed; pip install tensorboard"):
            requested_trackers("tensorboard")
    else:
        assert requested_trackers("tensorboard") == ["tensorboard"]


def test_sigterm_saves_stops_with_exit_75_and_resume_matches(straight_run, tmp_path):
    """A record every 3 steps, so that the stop falls inside a window: its sums travel in the
    checkpoint. The per-step losses of a resume after SIGTERM are test_launchers' (-sp 1)."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = [*TINY, "-s", "12", "-sp", "3", "-ss", "100", "--num_workers", "0", "-do", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "-m", "hnmix.train", *common], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 75, stderr[-3000:]
    [stopped_at] = checkpoints(tmp_path)
    step = json.loads((tmp_path / "checkpoints" / stopped_at / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 12 and "--resume latest" in stderr
    assert load_file(tmp_path / "checkpoints" / stopped_at / "model.safetensors")["queue.ptr"].item() == step * 8 % 64

    resumed = run_train(*common, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    per_step = losses(straight_run)
    # Records average their window; its sums travel in the checkpoint, so no window is cut short.
    windows = {s: sum(per_step[t] for t in range(s - 2, s + 1)) / 3 for s in (3, 6, 9, 12)}
    assert losses(tmp_path) == pytest.approx(windows, rel=1e-6)


def test_a_failed_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk during the second save: CheckpointError, step 2's checkpoint intact."""
    import errno

    from accelerate import Accelerator

    from hnmix.errors import CheckpointError
    from hnmix.train.config import parse_config
    from hnmix.train.loop import train

    real_save_state = Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(CheckpointError) as error:
        train(parse_config([*TINY, "-s", "6", "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0",
                            "-do", str(tmp_path)]))
    message = str(error.value)
    assert "No space left on device" in message and "step_00000002" in message and "\n" not in message
    assert checkpoints(tmp_path) == ["step_00000002"]  # the partial step-4 save is gone
    assert load_file(tmp_path / "checkpoints/step_00000002/model.safetensors")["queue.ptr"].item() == 16
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]


def test_unreadable_images_at_max_bad_fraction_train_to_the_end_each_counted_once(tmp_path):
    data = write_folder_with_corrupt_files(tmp_path / "images", good=38, corrupt=2)  # 2 of 40: 0.05
    result = run_train(*TINY[2:], "--dataset", str(data), "-s", "5", "-sp", "1", "-ss", "5", "--num_workers", "1",
                       "--eval_every", "0", "--max_bad_fraction", "0.05", "-do", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # 5 steps of 8: one epoch, every file drawn once; seed 69420 replaces both by readable images.
    assert records[-1]["bad_samples"] == 2
    assert "truncated_0.jpg" in result.stderr and "using image" in result.stderr


def test_unreadable_images_just_over_max_bad_fraction_stop_the_run_with_one_line(tmp_path):
    data = write_folder_with_corrupt_files(tmp_path / "images", good=38, corrupt=2)
    result = run_train(*TINY[2:], "--dataset", str(data), "-s", "5", "-sp", "1", "-ss", "5", "--num_workers", "0",
                       "--eval_every", "0", "--max_bad_fraction", "0.049", "-do", str(tmp_path / "out"))
    assert result.returncode == 2
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last == ("hnmix: error: 2 of the 40 images read so far could not be read (5.0% > --max_bad_fraction "
                    "0.049); fix or remove them, or raise --max_bad_fraction")
    # Judged once the whole dataset was read (40 images < 1000): steps 1-4 ran on.
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3, 4]


def test_a_failing_rank_brings_the_whole_job_down_quickly_with_its_error(tmp_path):
    started = time.monotonic()
    result = accelerate_launch([str(REPO / "tests/multiprocess/failing_rank.py"), *TINY, "-bs", "4", "-s", "20",
                                "-sp", "1", "-ss", "100", "--num_workers", "0", "-do", str(tmp_path)], timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    records = metrics(tmp_path) if (tmp_path / "metrics.jsonl").exists() else []
    assert len(records) <= 3  # rank 0 did not train on alone
    assert elapsed < 60, f"took {elapsed:.0f} s"  # start-up (imports of 2 processes) included


def nan_loss_on(monkeypatch, calls_with_nan):
    """Make MoCo.forward return a NaN loss (still in the graph, so gradients are NaN too) on these calls."""
    from hnmix.moco import MoCo

    original = MoCo.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        loss, stats, *keys = original(self, *args, **kwargs)
        return (loss * float("nan") if len(calls) in calls_with_nan else loss), stats, *keys

    monkeypatch.setattr(MoCo, "forward", forward)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    from hnmix.train.config import parse_config
    from hnmix.train.loop import train

    nan_loss_on(monkeypatch, {3, 4})
    assert train(parse_config([*TINY, "-s", "6", "-sp", "1", "-ss", "6", "--num_workers", "0", "--eval_every", "0",
                               "-do", str(tmp_path)])) == 0
    records = metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    weights = load_file(tmp_path / "checkpoints/step_00000006/model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
    # The two skipped steps enqueued nothing: 4 batches of 8 keys in the queue of 64.
    assert weights["queue.ptr"].item() == 4 * 8 and (weights["queue.ids"] >= 0).sum().item() == 32


def test_a_skipped_step_leaves_the_logged_means_to_the_applied_steps(tmp_path, monkeypatch):
    """Step 3 of the window 3-4 is skipped (NaN loss): the record of step 4 is step 4's loss alone."""
    from hnmix.moco import MoCo
    from hnmix.train.config import parse_config
    from hnmix.train.loop import train

    original, step_losses = MoCo.forward, []

    def forward(self, *args, **kwargs):  # the third step's loss and statistics are NaN, its gradients too
        loss, stats, *keys = original(self, *args, **kwargs)
        if len(step_losses) == 2:
            loss, stats = loss * float("nan"), {name: value * float("nan") for name, value in stats.items()}
        step_losses.append(stats["loss"].item())
        return loss, stats, *keys

    monkeypatch.setattr(MoCo, "forward", forward)
    assert train(parse_config([*TINY, "-s", "4", "-sp", "2", "-ss", "4", "--num_workers", "0", "--eval_every", "0",
                               "-do", str(tmp_path)])) == 0
    records = metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 1]
    assert records[0]["loss"] == pytest.approx((step_losses[0] + step_losses[1]) / 2, rel=1e-6)
    assert records[1]["loss"] == pytest.approx(step_losses[3], rel=1e-6)
    assert all(math.isfinite(value) for r in records for value in r.values() if isinstance(value, float))


def test_too_many_non_finite_steps_in_a_row_stop_and_name_the_last_good_checkpoint(tmp_path, monkeypatch):
    from hnmix.errors import TrainingDivergedError
    from hnmix.train.config import parse_config
    from hnmix.train.loop import train

    nan_loss_on(monkeypatch, set(range(4, 100)))
    with pytest.raises(TrainingDivergedError) as error:
        train(parse_config([*TINY, "-s", "20", "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0",
                            "--max_nonfinite_steps", "3", "-do", str(tmp_path)]))
    message = str(error.value)
    assert "3 steps in a row up to step 6" in message and "step_00000006" not in message
    assert checkpoints(tmp_path) == ["step_00000002", "step_00000004"] and "step_00000004" in message
    weights = load_file(tmp_path / "checkpoints/step_00000004/model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())


def test_sigkill_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(straight_run, tmp_path):
    common = [*TINY, "-s", "12", "-sp", "1", "-ss", "4", "--num_workers", "0", "-do", str(tmp_path)]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(REPO / "tests/faults/kill_during_save.py"), *common], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(tmp_path) == [".partial-step_00000008", "step_00000004"]
    resumed = run_train(*common, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Ignoring" in resumed.stderr and ".partial-step_00000008" in resumed.stderr
    assert "Resumed from" in resumed.stderr and "step_00000004" in resumed.stderr
    assert losses(tmp_path) == losses(straight_run)
    assert checkpoints(tmp_path)[-1] == "step_00000012"


def test_resuming_with_another_queue_size_is_refused_with_the_differences(straight_run, capfd):
    from hnmix.train.loop import main

    assert main([*TINY, "-s", "12", "-km", "128", "-do", str(straight_run), "--resume", "latest"]) == 2
    last = [line for line in capfd.readouterr().err.splitlines() if line.strip()][-1]
    assert "cannot resume" in last and "k_moco: 64 -> 128" in last
