"""The kNN monitor as MoCo's CIFAR-10 demo runs it (issue 20): after every epoch (--eval_every 1ep),
on the test split with the whole train split as bank (--knn_split test), on the query encoder's
normalised projection (--knn_features projection), images uncropped (--eval_crop_pct 1) and
normalised as the views are; every kNN record says which split and how many images it used.
A copy laid out like the Hub's uoft-cs/cifar10 stands in for CIFAR-10."""

import io

import numpy as np
import pytest
import torch
import yaml
from data_images import write_cifar10_like_repo
from huggingface_hub import ModelCard
from PIL import Image
from tiny_run import TINY, metrics

import hnmix.evaluate.monitor
from hnmix.errors import ConfigError
from hnmix.evaluate.probes import knn_accuracy
from hnmix.train.components import build_knn_monitor
from hnmix.train.config import (
    TrainConfig,
    config_differences,
    config_to_yaml,
    eval_every_steps,
    knn_monitor_on,
    parse_config,
)
from hnmix.train.log_lines import format_details, format_record
from hnmix.train.loop import main, train
from hnmix.run_config import flat_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAIN_IMAGES, TEST_IMAGES = 40, 12  # batch 8: 5 steps per epoch
CIFAR_RUN = [*TINY[4:], "--image_column", "img", "-ss", "100", "--num_workers", "0", "--eval_max_samples", "0"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return str(write_cifar10_like_repo(tmp_path_factory.mktemp("cifar10"), {"train": TRAIN_IMAGES, "test": TEST_IMAGES}))


def test_the_demos_monitor_runs_after_every_epoch_on_the_test_split_with_the_projection(cifar, tmp_path, monkeypatch):
    scored = []

    def spy(bank, bank_labels, queries, query_labels, **options):
        scored.append((bank.shape, queries.shape, bank.norm(dim=1)))
        return knn_accuracy(bank, bank_labels, queries, query_labels, **options)

    monkeypatch.setattr(hnmix.evaluate.monitor, "knn_accuracy", spy)
    out = tmp_path / "out"
    assert train(parse_config([*CIFAR_RUN, "--dataset", cifar, "-s", "10", "-sp", "1", "--eval_every", "1ep",
                               "--knn_split", "test", "--knn_features", "projection", "--eval_crop_pct", "1",
                               "--normalize", "cifar10", "-do", str(out)])) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 11))  # the log lines and records go on as before
    evaluated = [r for r in records if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in evaluated] == [(5, 0), (10, 1)]  # each epoch's last step
    for record in evaluated:
        assert (record["knn_split"], record["knn_bank"], record["knn_queries"]) == ("test", TRAIN_IMAGES, TEST_IMAGES)
    # The monitor compared dim_moco-wide unit vectors (the head's output), not the backbone's features.
    for bank_shape, query_shape, norms in scored:
        assert bank_shape == (TRAIN_IMAGES, 16) and query_shape == (TEST_IMAGES, 16)
        torch.testing.assert_close(norms, torch.ones(TRAIN_IMAGES))
    assert (out / "curves.png").is_file()  # the curves are drawn with the split's name in the records
    assert "On split `test`." in ModelCard.load(out / "encoder/README.md").text


def test_the_monitor_takes_the_runs_normalisation_crop_and_split(cifar):
    config = parse_config([*CIFAR_RUN, "--dataset", cifar, "--knn_split", "test", "--knn_features", "projection",
                           "--eval_crop_pct", "1", "--normalize", "cifar10"])
    monitor = build_knn_monitor(config, hnmix.train.components.Accelerator(cpu=True))
    assert (monitor.split, monitor.features) == ("test", "projection")
    assert (len(monitor.bank_loader.dataset), len(monitor.query_loader.dataset)) == (TRAIN_IMAGES, TEST_IMAGES)
    images = monitor.query_loader.dataset
    # The test split's first PNG (32x32) through ToTensor and CIFAR-10's Normalize, nothing else.
    pixels = np.asarray(Image.open(io.BytesIO(images.dataset[0]["img"]["bytes"])).convert("RGB"))
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(images[0][0], expected)


def test_without_knn_split_the_monitor_holds_out_a_part_of_train_as_before(cifar):
    config = parse_config([*CIFAR_RUN, "--dataset", cifar, "--eval_split_size", "10"])
    monitor = build_knn_monitor(config, hnmix.train.components.Accelerator(cpu=True))
    assert (monitor.split, monitor.features) == ("train (held-out part)", "backbone")
    assert (len(monitor.bank_loader.dataset), len(monitor.query_loader.dataset)) == (TRAIN_IMAGES - 10, 10)


def test_a_knn_split_the_dataset_lacks_stops_the_start_with_one_line_listing_its_splits(cifar, tmp_path, capsys):
    assert main([*CIFAR_RUN, "--dataset", cifar, "-s", "2", "--knn_split", "validation", "-do", str(tmp_path / "o")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == (f"hnmix: error: option knn_split: split 'validation' does not exist in dataset {cifar}; "
                         "available splits: train, test")


@pytest.mark.parametrize("argv, line", [
    (["--knn_split", "train"], "option knn_split: train is the split trained on"),
    (["--eval_every", "-1"], "option eval_every must be a number of steps (e.g. 1000; 0: off) or of epochs"),
    (["--eval_every", "1epoch"], "option eval_every must be a number of steps"),
    (["--eval_crop_pct", "0"], "option eval_crop_pct must be in (0, 1] (1: no crop), got 0.0"),
    (["--eval_crop_pct", "1.2"], "option eval_crop_pct must be in (0, 1]"),
])
def test_bad_values_are_one_line(argv, line):
    with pytest.raises(ConfigError) as caught:
        parse_config(argv)
    assert str(caught.value).startswith(line) and "\n" not in str(caught.value)


def test_knn_features_has_two_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--knn_features", "logits"])
    assert "choose from 'backbone', 'projection'" in capsys.readouterr().err


def test_eval_every_takes_steps_or_epochs_from_flags_and_yaml(tmp_path):
    assert parse_config([]).evaluation.eval_every == "1000"
    assert eval_every_steps(parse_config(["--eval_every", "250"]), steps_per_epoch=97) == 250
    epochs = parse_config(["--eval_every", "2ep"])
    assert epochs.evaluation.eval_every == "2ep" and eval_every_steps(epochs, steps_per_epoch=97) == 194
    assert eval_every_steps(epochs, steps_per_epoch=None) is None and knn_monitor_on(epochs)
    assert not knn_monitor_on(parse_config(["--eval_every", "0"])) and not knn_monitor_on(parse_config(["--eval_every", "0ep"]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval_every: 25020\n")  # a number in YAML, as the recipes and older runs write it
    assert parse_config(["--config", str(recipe)]).evaluation.eval_every == "25020"
    recipe.write_text("eval_every: 1ep\n")
    assert parse_config(["--config", str(recipe)]).evaluation.eval_every == "1ep"
    assert TrainConfig.from_options(eval_every=7).evaluation.eval_every == "7"  # code that still passes an int


def test_a_checkpoint_from_before_these_options_resumes_unchanged():
    """An older run's config.yaml: eval_every an int, no knn_split, knn_features, eval_crop_pct.
    Nothing differs, not even among the options that may change on resume."""
    current = parse_config(["--eval_every", "2"])
    saved = flat_options(yaml.safe_load(config_to_yaml(current)))
    saved["eval_every"] = 2
    for name in ("knn_split", "knn_features", "eval_crop_pct"):
        del saved[name]
    assert config_differences(saved, current) == [] and config_differences(saved, current, resumable=True) == []
    # They belong to the run: the kNN curve of one run measures one thing.
    changed = parse_config(["--eval_every", "2", "--knn_features", "projection", "--knn_split", "test"])
    assert config_differences(saved, changed) == ["knn_split: None -> 'test'",
                                                  "knn_features: 'backbone' -> 'projection'"]
    assert config_differences(saved, parse_config(["--eval_every", "1ep"]), resumable=True) == \
        ["eval_every: 2 -> '1ep'"]


def test_the_log_line_reads_a_record_with_the_split_and_counts():
    record = {"step": 5, "epoch": 0, "loss": 7.25, "knn_top1": 31.98, "knn_top5": 80.5, "knn_split": "test",
              "knn_bank": 50000, "knn_queries": 10000}
    assert format_record(record, 10) == "step 5/10  loss 7.2500  kNN 32.0/80.5%"
    assert format_details(record) == "epoch 0  knn_split test  knn_bank 50000  knn_queries 10000"
