"""configs/: every recipe loads and validates, its arithmetic holds, and the CPU demo trains."""

import pytest
import yaml

from hnmix.run_config import flat_options

from hnmix.train.config import curriculum_steps, parse_config
from hnmix.train.loop import train
from hnmix.run_config import load_run_config
from launch import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Training images of the datasets the recipes name, and the global batch each recipe is written for.
TRAIN_IMAGES = {"ILSVRC/imagenet-1k": 1_281_167, "ilee0022/Caltech-256": 24_791, "uoft-cs/cifar10": 50_000}
GLOBAL_BATCH = {"mocov2_imagenet": 256, "mochi_imagenet": 256, "mochi_caltech256": 256, "moco_cifar10": 512,
                "mochi_cifar10": 512}
SINGLE_PROCESS = ("mochi_caltech256", "moco_cifar10", "mochi_cifar10", "demo_cpu")


def test_there_are_the_six_recipes():
    assert {path.stem for path in CONFIGS} == {"mocov2_imagenet", "mochi_imagenet", "mochi_caltech256", "demo_cpu",
                                               "moco_cifar10", "mochi_cifar10"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_each_recipe_loads_validates_and_cites_its_sources(path):
    config = parse_config(["--config", str(path)])
    for name, value in flat_options(yaml.safe_load(path.read_text())).items():  # every value reaches the config (YAML ints as steps)
        got = config.options()[name]
        assert got == value or got == str(value) or (isinstance(got, tuple) and list(got) == value), name
    assert path.read_text().startswith("#")  # a comment saying where the values come from


@pytest.mark.parametrize("name", sorted(GLOBAL_BATCH))
def test_recipe_steps_are_the_epochs_they_claim_and_mixing_starts_inside_the_run(name):
    config = parse_config(["--config", str(REPO / f"configs/{name}.yaml")])
    steps_per_epoch = TRAIN_IMAGES[config.data.dataset] // GLOBAL_BATCH[name]
    assert config.optimization.steps % steps_per_epoch == 0
    assert config.method.k_moco % GLOBAL_BATCH[name] == 0
    for start in curriculum_steps(config.method, steps_per_epoch=steps_per_epoch):
        assert start < config.optimization.steps


def test_the_mochi_recipes_differ_from_moco_v2_only_in_the_mixing():
    mocov2 = load_run_config(REPO / "configs/mocov2_imagenet.yaml")
    mochi = load_run_config(REPO / "configs/mochi_imagenet.yaml")
    assert {k for k in mocov2 | mochi if mocov2.get(k) != mochi.get(k)} == {
        "n_hard", "s1_hard", "s2_hard", "start1_hard", "start2_hard"}
    assert (mochi["n_hard"], mochi["s1_hard"], mochi["s2_hard"]) == (1024, 1024, 512)
    assert (mocov2["optimizer"], mocov2["lr_per_256"], mocov2["weight_decay"], mocov2["t_moco"]) == ("sgd", 0.03, 1e-4, 0.2)


def test_the_caltech_recipe_keeps_its_queue_well_below_the_dataset():
    config = parse_config(["--config", str(REPO / "configs/mochi_caltech256.yaml")])
    assert config.method.k_moco <= TRAIN_IMAGES[config.data.dataset] / 4


@pytest.mark.usefixtures("one_torch_thread")
def test_the_cpu_demo_trains(tmp_path):
    # The demo as the README runs it, its first 6 steps (CI time).
    assert train(parse_config(["--config", str(REPO / "configs/demo_cpu.yaml"), "--dir_out", str(tmp_path),
                               "--steps", "6", "--steps_print", "3", "--steps_save", "6", "--eval_every", "6"])) == 0
    assert (tmp_path / "encoder/model.safetensors").exists()
    assert [yaml.safe_load(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3, 6]


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_single_process_recipes_shuffle_batchnorm(name):
    """One GPU has no shuffle BN across processes: the recipes split BatchNorm as MoCo's demo does."""
    assert parse_config(["--config", str(REPO / f"configs/{name}.yaml")]).method.bn_splits == 8


def test_the_cifar_recipes_are_moco_s_demo_and_differ_only_in_the_mixing():
    from hnmix.references import load_reference

    moco = load_run_config(REPO / "configs/moco_cifar10.yaml")
    mochi = load_run_config(REPO / "configs/mochi_cifar10.yaml")
    assert {k for k in moco | mochi if moco.get(k) != mochi.get(k)} == {
        "n_hard", "s1_hard", "s2_hard", "start1_hard", "start2_hard"}
    config = parse_config(["--config", str(REPO / "configs/moco_cifar10.yaml")])
    demo = {"arch": "resnet18", "stem": "cifar", "head": "linear", "dim_moco": 128, "img_size": 32, "batch_size": 512,
            "optimizer": "sgd", "lr_base": 0.06, "momentum": 0.9, "weight_decay": 5e-4, "decay_all_params": True,
            "warmup_fraction": 0.0, "lr_min": 0.0, "clip_grad": 0.0, "k_moco": 4096, "m_moco": 0.99, "t_moco": 0.1,
            "symmetric": False, "bn_splits": 8, "crop_scale": (0.08, 1.0), "flip_p": 0.5, "jitter": (0.4, 0.4, 0.4, 0.1),
            "jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.0, "knn_k": 200, "knn_temperature": 0.1,
            "knn_split": "test", "knn_features": "projection", "eval_every": "1ep", "eval_crop_pct": 1.0,
            "eval_max_samples": 0, "s1_hard": 0, "s2_hard": 0, "steps": 200 * (50_000 // 512)}
    assert {name: config.options()[name] for name in demo} == {k: list(v) if isinstance(v, tuple) else v for k, v in demo.items()}
    assert config.augmentation.normalize == "cifar10" or tuple(config.augmentation.normalize) == (0.4914, 0.4822, 0.4465, 0.2023, 0.1994, 0.2010)
    assert load_reference("moco_cifar10_demo").knn_top1_by_epoch[200] == 82.58  # the curve the recipe is checked against


@pytest.mark.usefixtures("one_torch_thread")
def test_the_cifar_recipe_trains_on_a_cifar_layout_as_it_says(tmp_path):
    """configs/moco_cifar10.yaml on a tiny copy laid out like uoft-cs/cifar10, only the sizes shrunk:
    the stem, the head, the split BN, the decay and the augmentation it sets are those trained, the
    kNN runs after every epoch on the test split, and the export loads with hnmix.load_encoder."""
    import torch
    from data_images import write_cifar10_like_repo
    from safetensors.torch import load_file

    import hnmix
    from hnmix.moco import MoCoEncoder

    data = write_cifar10_like_repo(tmp_path / "cifar10", {"train": 48, "test": 20})
    out = tmp_path / "run"
    assert train(parse_config(["--config", str(REPO / "configs/moco_cifar10.yaml"), "--dataset", str(data),
                               "--dir_out", str(out), "--device", "cpu", "--batch_size", "16", "--k_moco", "64",
                               "--steps", "6", "--steps_print", "3", "--num_workers", "0"])) == 0
    saved = load_run_config(out / "config.yaml")
    assert (saved["stem"], saved["head"], saved["bn_splits"], saved["decay_all_params"]) == ("cifar", "linear", 8, True)
    assert (saved["crop_scale"], saved["blur_p"]) == ([0.08, 1.0], 0.0)
    [checkpoint] = (out / "checkpoints").iterdir()
    weights = load_file(checkpoint / "model.safetensors")
    assert weights["encoder_q.backbone.conv1.weight"].shape == (64, 3, 3, 3)  # the CIFAR stem
    assert weights["encoder_q.head.weight"].shape == (128, 512)  # MoCo v1's linear head
    records = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["knn_split"], r["knn_queries"]) for r in records if "knn_top1" in r] == [(3, "test", 20), (6, "test", 20)]
    assert {r["steps_per_epoch"] for r in records} == {3}  # 48 images, batch 16
    encoder = hnmix.load_encoder(str(out / "encoder")).eval()
    trained = MoCoEncoder("resnet18", 128, stem="cifar", head="linear").backbone.eval()
    trained.load_state_dict({k.removeprefix("encoder_q.backbone."): v for k, v in weights.items()
                             if k.startswith("encoder_q.backbone.")})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), trained(images))
