"""python -m hnmix.bench learn at tiny sizes: both arms and the untrained network, for every seed,
in one table and one JSON (correctness only: no timing, and accuracy only where the data makes
it certain)."""

import json
import logging
import subprocess
import sys

import pytest
from accelerate.state import AcceleratorState, GradientState
from data_images import write_cifar10_like_repo

from hnmix.bench.learn import LEARN_DEFAULTS, METRICS, arm_configs, evaluate, learn_defaults, untrained_checkpoint
from hnmix.data.augmentation import CIFAR10_MEAN
from hnmix.train.config import parse_config
from launch import REPO

TINY_LEARN = ["--dataset", "synthetic", "--synthetic_size", "64", "-a", "test_resnet", "-i", "32", "-bs", "16",
              "-km", "64", "-dm", "16", "-nh", "8", "-s1h", "4", "-s2h", "4", "-s", "3", "-sp", "1",
              "--num_workers", "0"]


def test_the_arms_differ_only_in_the_synthetic_negatives():
    config = parse_config([*LEARN_DEFAULTS, *TINY_LEARN])  # as bench learn reads its options
    arms = arm_configs(config)
    moco, mochi = arms["moco"].options(), arms["mochi"].options()
    assert {k for k in moco if moco[k] != mochi[k]} == {"s1_hard", "s2_hard"}
    assert (moco["s1_hard"], moco["s2_hard"], mochi["s1_hard"], mochi["s2_hard"]) == (0, 0, 4, 4)


def test_a_config_recipe_is_not_overridden_by_the_small_default_recipe():
    argv = ["--config", str(REPO / "configs" / "moco_cifar10.yaml")]
    config = parse_config([*learn_defaults(argv), *argv])
    assert (config.model.arch, config.model.stem, config.data.img_size, config.optimization.batch_size, config.data.dataset) == \
        ("resnet18", "cifar", 32, 512, "uoft-cs/cifar10")
    assert parse_config([*learn_defaults(TINY_LEARN), *TINY_LEARN]).optimization.warmup_fraction == 0.05  # LEARN_DEFAULTS'


def test_a_recipe_without_num_workers_leaves_the_evaluations_worker_count_to_its_default():
    from hnmix.bench.learn import evaluation_argv
    from hnmix.evaluate.cli import build_parser

    argv = ["--config", str(REPO / "configs" / "moco_cifar10.yaml")]
    config = parse_config([*learn_defaults(argv), *argv])
    assert config.data.num_workers is None  # the GPU recipes size their workers to the machine
    command = evaluation_argv("runs/x/checkpoints/step_1", config, "knn", REPO / "knn.json")
    assert "--num_workers" not in command
    build_parser().parse_args(command)  # "None" would be refused
    config = parse_config([*argv, "--num_workers", "3"])
    assert build_parser().parse_args(evaluation_argv("m", config, "knn", REPO / "knn.json")).num_workers == 3


@pytest.fixture
def restore_logging_and_accelerate():
    """The evaluation runs in this process: give the root logger and Accelerate's state back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_the_knn_evaluation_follows_the_recipes_monitor(tmp_path, restore_logging_and_accelerate):
    data = write_cifar10_like_repo(tmp_path / "cifar", {"train": 20, "test": 10})
    config = parse_config([*LEARN_DEFAULTS, *TINY_LEARN, "--dataset", str(data), "--image_column", "img",
                           "--normalize", "cifar10", "--knn_split", "test", "--knn_features", "projection",
                           "--eval_crop_pct", "1", "--knn_k", "3", "--knn_temperature", "0.5", "--eval_max_samples", "0"])
    checkpoint = untrained_checkpoint(config, tmp_path / "untrained")
    evaluate(str(checkpoint), config, "knn", tmp_path / "knn.json")
    report = json.loads((tmp_path / "knn.json").read_text())
    settings = report["settings"]
    assert (settings["knn_split"], settings["knn_features"], settings["eval_crop_pct"], settings["knn_k"],
            settings["knn_temperature"]) == ("test", "projection", 1.0, 3, 0.5)
    assert settings["normalize_mean"] == list(CIFAR10_MEAN) and report["dataset"]["sizes"] == {"train": 20, "held_out": 10}


def test_learn_trains_and_evaluates_every_arm_for_every_seed(tmp_path):
    out = tmp_path / "learn.json"
    done = subprocess.run([sys.executable, "-m", "hnmix.bench", "learn", "--seeds", "2", "--json", str(out),
                           *TINY_LEARN], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["seeds"] == [69420, 69421]
    assert set(report["arms"]) == {"untrained", "moco", "mochi"}
    for arm, summary in report["arms"].items():
        assert len(summary["runs"]) == 2, arm
        for name in METRICS:
            values = [run[name] for run in summary["runs"]]
            assert summary[name]["mean"] == sum(values) / 2
            # `synthetic` (10 classes) is separable by an untrained network: every arm is far above chance.
            if name == "knn_top1":
                assert min(values) > 30, (arm, values)
    assert report["mochi_minus_moco"]["knn_top1"] == (report["arms"]["mochi"]["knn_top1"]["mean"]
                                                      - report["arms"]["moco"]["knn_top1"]["mean"])
    assert "MoCo against MoCHi" in " ".join(done.stdout.split())
    # The evaluations and the trainings share one process and one logger: each line is printed once.
    starts = [line for line in done.stderr.splitlines() if "Training test_resnet on synthetic" in line]
    assert len(starts) == 4, done.stderr[-3000:]  # 2 arms x 2 seeds
