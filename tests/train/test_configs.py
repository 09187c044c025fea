"""configs/: every recipe loads and validates, its arithmetic holds, and the CPU demo trains."""

import pytest
import yaml

from hnmix.train.config import curriculum_steps, parse_config
from hnmix.train.loop import train
from launch import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Training images of the datasets the recipes name, and the global batch each recipe is written for.
TRAIN_IMAGES = {"ILSVRC/imagenet-1k": 1_281_167, "ilee0022/Caltech-256": 24_791}
GLOBAL_BATCH = {"mocov2_imagenet": 256, "mochi_imagenet": 256, "mochi_caltech256": 256}


def test_there_are_the_four_recipes():
    assert {path.stem for path in CONFIGS} == {"mocov2_imagenet", "mochi_imagenet", "mochi_caltech256", "demo_cpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_each_recipe_loads_validates_and_cites_its_sources(path):
    config = parse_config(["--config", str(path)])
    for name, value in yaml.safe_load(path.read_text()).items():  # every value reaches the config (YAML ints as steps)
        assert getattr(config, name) == value or getattr(config, name) == str(value), name
    assert path.read_text().startswith("#")  # a comment saying where the values come from


@pytest.mark.parametrize("name", sorted(GLOBAL_BATCH))
def test_recipe_steps_are_the_epochs_they_claim_and_mixing_starts_inside_the_run(name):
    config = parse_config(["--config", str(REPO / f"configs/{name}.yaml")])
    steps_per_epoch = TRAIN_IMAGES[config.dataset] // GLOBAL_BATCH[name]
    assert config.steps % steps_per_epoch == 0
    assert config.k_moco % GLOBAL_BATCH[name] == 0
    for start in curriculum_steps(config, steps_per_epoch=steps_per_epoch):
        assert start < config.steps


def test_the_mochi_recipes_differ_from_moco_v2_only_in_the_mixing():
    mocov2 = yaml.safe_load((REPO / "configs/mocov2_imagenet.yaml").read_text())
    mochi = yaml.safe_load((REPO / "configs/mochi_imagenet.yaml").read_text())
    assert {k for k in mocov2 | mochi if mocov2.get(k) != mochi.get(k)} == {
        "n_hard", "s1_hard", "s2_hard", "start1_hard", "start2_hard"}
    assert (mochi["n_hard"], mochi["s1_hard"], mochi["s2_hard"]) == (1024, 1024, 512)
    assert (mocov2["optimizer"], mocov2["lr_per_256"], mocov2["weight_decay"], mocov2["t_moco"]) == ("sgd", 0.03, 1e-4, 0.2)


def test_the_caltech_recipe_keeps_its_queue_well_below_the_dataset():
    config = parse_config(["--config", str(REPO / "configs/mochi_caltech256.yaml")])
    assert config.k_moco <= TRAIN_IMAGES[config.dataset] / 4


@pytest.mark.usefixtures("one_torch_thread")
def test_the_cpu_demo_trains(tmp_path):
    # The demo as the README runs it, its first 6 steps (CI time).
    assert train(parse_config(["--config", str(REPO / "configs/demo_cpu.yaml"), "--dir_out", str(tmp_path),
                               "--steps", "6", "--steps_print", "3", "--steps_save", "6", "--eval_every", "6"])) == 0
    assert (tmp_path / "encoder/model.safetensors").exists()
    assert [yaml.safe_load(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3, 6]
