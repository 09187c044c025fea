"""The augmentation options of hnmix.train (--crop_scale ... --normalize): read from flags and YAML
alike, checked with one line, saved and compared on resume, and carried to every place that uses
them: both halves of the augmentation, the kNN monitor, the exported encoder, hnmix.evaluate."""

import json
import logging
import shutil
from contextlib import contextmanager

import pytest
import timm
import yaml
from accelerate import Accelerator
from tiny_run import TINY

import hnmix.train.loop as loop
from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, MOCO_CIFAR10_DEMO, MOCO_V2
from hnmix.data.photometric import StepPhotometric
from hnmix.errors import ConfigError
from hnmix.evaluate.cli import main as evaluate
from hnmix.evaluate.models import load_backbone
from hnmix.run_config import flat_options
from hnmix.train.components import build_data, build_knn_monitor
from hnmix.train.config import TrainConfig, config_differences, config_to_yaml, parse_config
from hnmix.train.state import checkpoint_to_resume
from hnmix.run_config import load_run_config

DEMO = ["--crop_scale", "0.08,1", "--blur_p", "0", "--normalize", "cifar10"]  # MoCo's CIFAR-10 demo
OTHER = ["--crop_scale", "0.08,1", "--flip_p", "0.3", "--jitter", "0.8,0.8,0.8,0.2", "--jitter_p", "0.6",
         "--grayscale_p", "0.4", "--blur_p", "0.9", "--blur_sigma", "0.5,1.5", "--normalize", "0.5,0.5,0.5,0.25,0.25,0.25"]


def test_the_defaults_are_moco_v2():
    config = parse_config([])
    assert config.augmentation == MOCO_V2
    assert (config.augmentation.crop_scale, config.augmentation.jitter, config.augmentation.blur_sigma, config.augmentation.normalize) == (
        (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), (0.1, 2.0), "imagenet")


def test_flags_and_yaml_lists_and_yaml_text_give_the_same_options(tmp_path):
    flags = parse_config(OTHER)
    assert flags.augmentation.crop_scale == (0.08, 1.0) and flags.augmentation.jitter == (0.8, 0.8, 0.8, 0.2) and flags.augmentation.flip_p == 0.3
    assert (flags.augmentation.mean, flags.augmentation.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    lists = tmp_path / "lists.yaml"
    lists.write_text("crop_scale: [0.08, 1]\nflip_p: 0.3\njitter: [0.8, 0.8, 0.8, 0.2]\njitter_p: 0.6\n"
                     "grayscale_p: 0.4\nblur_p: 0.9\nblur_sigma: [0.5, 1.5]\nnormalize: [0.5, 0.5, 0.5, 0.25, 0.25, 0.25]\n")
    text = tmp_path / "text.yaml"
    text.write_text('crop_scale: "0.08,1"\nflip_p: 0.3\njitter: 0.8,0.8,0.8,0.2\njitter_p: 0.6\n'
                    'grayscale_p: 0.4\nblur_p: 0.9\nblur_sigma: 0.5, 1.5\nnormalize: "0.5,0.5,0.5,0.25,0.25,0.25"\n')
    for path in (lists, text):
        assert dataclass_without_config(parse_config(["--config", str(path)])) == flags


def dataclass_without_config(config: TrainConfig) -> TrainConfig:
    return config.with_options(config=None)


def test_flags_override_the_yaml_files_augmentation(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("crop_scale: [0.08, 1]\nblur_p: 0\nnormalize: cifar10\n")
    assert parse_config(["--config", str(path)]).augmentation == MOCO_CIFAR10_DEMO
    config = parse_config(["--config", str(path), "--crop_scale", "0.3,0.9", "--normalize", "imagenet"])
    assert (config.augmentation.crop_scale, config.augmentation.blur_p, config.augmentation.normalize) == ((0.3, 0.9), 0.0, "imagenet")


@pytest.mark.parametrize("argv, message", [
    (["--crop_scale", "0.5,0.2"], "option crop_scale must be MIN,MAX with 0 < MIN <= MAX <= 1, got 0.5,0.2"),
    (["--crop_scale", "0.5"], "option crop_scale must be 2 numbers, e.g. 0.08,1 (in YAML also [0.08, 1]), got '0.5'"),
    (["--jitter", "0.4,0.4,0.4"], "option jitter must be 4 numbers"),
    (["--flip_p", "1.5"], "option flip_p is a probability: it must be in [0, 1], got 1.5"),
    (["--blur_p", "-0.5"], "option blur_p is a probability"),
    (["--blur_sigma", "2,0.1"], "option blur_sigma must be MIN,MAX with 0 < MIN <= MAX, got 2,0.1"),
    (["--normalize", "imagenet21k"], "option normalize must be imagenet, cifar10 or six numbers"),
])
def test_a_bad_flag_is_one_config_error_line_naming_the_option(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("crop_scale: [0.2]\n", "option crop_scale must be 2 numbers"),
    ("crop_scale: true\n", "option crop_scale must be 2 numbers"),
    ("crop_scale: [0.9, 0.1]\n", "option crop_scale must be MIN,MAX with 0 < MIN <= MAX <= 1"),
    ("grayscale_p: 1.2\n", "option grayscale_p is a probability"),
    ("jitter_p: often\n", "option jitter_p must be float, got 'often'"),
    ("jitter: [0.4, 0.4, 0.4, 0.7]\n", "option jitter must be four strengths >= 0, the hue's at most 0.5"),
    ("normalize: [0.5, 0.5, 0.5]\n", "option normalize must be imagenet, cifar10 or six numbers"),
])
def test_a_bad_yaml_value_is_one_config_error_line_naming_the_option(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(path)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_saved_config_writes_lists_that_load_back_equal(tmp_path):
    config = parse_config(OTHER)
    text = config_to_yaml(config)
    assert "crop_scale: [0.08, 1.0]\n" in text and "normalize: 0.5,0.5,0.5,0.25,0.25,0.25\n" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert dataclass_without_config(parse_config(["--config", str(path)])) == config
    assert TrainConfig.from_options(flat_options(yaml.safe_load(text))) == config


def test_a_config_saved_before_the_options_compares_as_moco_v2_and_a_change_is_refused():
    """The augmentation is part of the run: a checkpoint whose config.yaml lacks the keys trained
    with MoCo v2's values and resumes with them; any other value is a difference."""
    saved = {name: value for name, value in parse_config([]).options().items()
             if name not in MOCO_V2.__dataclass_fields__}
    assert config_differences(saved, parse_config([])) == []
    assert config_differences(saved, parse_config(["--blur_p", "0", "--crop_scale", "0.08,1"])) == [
        "crop_scale: [0.2, 1.0] -> [0.08, 1.0]", "blur_p: 0.5 -> 0.0"]
    assert config_differences(parse_config(DEMO).to_dict(), parse_config(DEMO)) == []


@contextmanager
def logging_left_as_it_was():
    """hnmix.train and hnmix.evaluate set up logging for their run (a rich handler on the root
    logger): the tests after these in-process runs get the root logger back as it was."""
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        yield
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Two steps of MoCo's CIFAR-10 demo augmentation, the photometric half batched (on the CPU);
    the batched half the loop built is recorded."""
    dir_out = tmp_path_factory.mktemp("demo")
    built = {}

    class RecordedStepPhotometric(StepPhotometric):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built["batched"] = self

    with pytest.MonkeyPatch.context() as patch, logging_left_as_it_was():
        patch.setattr(loop, "StepPhotometric", RecordedStepPhotometric)
        run = [*TINY, "-s", "2", "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0",
               "--augment_device", "accelerator", "--device", "cpu"]
        assert loop.train(parse_config([*run, *DEMO, "-do", str(dir_out)])) == 0
    return dir_out, built, run


def test_the_batched_half_gets_the_options(demo_run):
    _, built, _ = demo_run
    assert built["batched"].augmentation == MOCO_CIFAR10_DEMO


def test_the_knn_monitor_normalises_as_the_training_views(one_torch_thread):
    config = parse_config([*TINY, *DEMO, "--num_workers", "0", "--eval_every", "2", "--eval_max_samples", "16"])
    monitor = build_knn_monitor(config, Accelerator(cpu=True))
    for loader in (monitor.bank_loader, monitor.query_loader):
        normalize = loader.dataset.transform.transforms[-1]
        assert (tuple(normalize.mean), tuple(normalize.std)) == (CIFAR10_MEAN, CIFAR10_STD)


def test_the_per_image_half_gets_the_options(one_torch_thread):
    config = parse_config([*TINY, *DEMO, "--num_workers", "0"])
    loader, _ = build_data(config, Accelerator(cpu=True), photometric_in_workers=True)
    assert loader.dataset.augmentation == MOCO_CIFAR10_DEMO  # the crops and flips
    kinds = [type(step).__name__ for step in loader.dataset.photometric.transforms]
    assert kinds == ["RandomApply", "RandomGrayscale", "ToTensor", "Normalize"]  # no blur
    normalize = loader.dataset.photometric.transforms[-1]
    assert (tuple(normalize.mean), tuple(normalize.std)) == (CIFAR10_MEAN, CIFAR10_STD)


def test_the_saved_config_and_the_exported_encoder_carry_the_options(demo_run):
    dir_out, _, _ = demo_run
    saved = load_run_config(dir_out / "config.yaml")
    assert (saved["crop_scale"], saved["blur_p"], saved["normalize"]) == ([0.08, 1.0], 0.0, "cifar10")
    cfg = json.loads((dir_out / "encoder/config.json").read_text())["pretrained_cfg"]
    assert (cfg["mean"], cfg["std"]) == (list(CIFAR10_MEAN), list(CIFAR10_STD))
    encoder = timm.create_model(f"local-dir:{dir_out / 'encoder'}", pretrained=True)
    data_config = timm.data.resolve_model_data_config(encoder)  # what a user of the encoder gets
    assert (tuple(data_config["mean"]), tuple(data_config["std"])) == (CIFAR10_MEAN, CIFAR10_STD)


def test_hnmix_evaluate_normalises_as_the_encoder_was_trained(demo_run, tmp_path, capsys, one_torch_thread):
    dir_out, _, _ = demo_run
    checkpoint = dir_out / "checkpoints/step_00000002"
    for model in (dir_out / "encoder", checkpoint):
        assert load_backbone(str(model)).normalization() == (CIFAR10_MEAN, CIFAR10_STD)
    report_path = tmp_path / "report.json"
    with logging_left_as_it_was():
        assert evaluate([str(dir_out / "encoder"), "--batch_size", "8", "--num_workers", "0", "--eval_max_samples",
                         "16", "--json", str(report_path)]) == 0, capsys.readouterr().err
    settings = json.loads(report_path.read_text())["settings"]
    assert (settings["normalize_mean"], settings["normalize_std"]) == (list(CIFAR10_MEAN), list(CIFAR10_STD))
    older = tmp_path / "older"  # a checkpoint from before the options: it trained with ImageNet's statistics
    shutil.copytree(checkpoint, older)
    saved = load_run_config(older / "config.yaml")
    (older / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in saved.items() if k != "normalize"}))
    assert load_backbone(str(older)).normalization() == (IMAGENET_MEAN, IMAGENET_STD)


def test_resuming_keeps_the_augmentation(demo_run, tmp_path):
    """The same options resume; a changed one is refused with the difference; a checkpoint whose
    config.yaml predates the options resumes with MoCo v2's values and refuses others."""
    dir_out, _, run = demo_run
    resume = [*run, "--resume", "latest", "-s", "4"]
    assert checkpoint_to_resume(parse_config([*resume, *DEMO, "-do", str(dir_out)]), 1) == \
        dir_out / "checkpoints/step_00000002"
    with pytest.raises(ConfigError, match=r"different configuration: crop_scale: \[0.08, 1.0\] -> \[0.2, 1.0\]"):
        checkpoint_to_resume(parse_config([*resume, *DEMO, "--crop_scale", "0.2,1", "-do", str(dir_out)]), 1)
    older = tmp_path / "older"
    shutil.copytree(dir_out / "checkpoints", older / "checkpoints")
    config_file = older / "checkpoints/step_00000002/config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({k: v for k, v in flat_options(saved).items() if k not in MOCO_V2.__dataclass_fields__}))
    moco_v2 = [*resume, "-do", str(older)]
    assert checkpoint_to_resume(parse_config(moco_v2), 1) == older / "checkpoints/step_00000002"
    with pytest.raises(ConfigError, match="normalize: 'imagenet' -> 'cifar10'"):
        checkpoint_to_resume(parse_config([*moco_v2, "--normalize", "cifar10"]), 1)
