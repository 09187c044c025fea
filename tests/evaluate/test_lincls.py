"""`--protocol lincls` (the papers' linear evaluation), the fast probe's selection split, and an
exported encoder's run config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.evaluate.cli import main
from hnmix.evaluate.features import EvalImages
from hnmix.evaluate.lincls import AugmentedImages, LinclsSettings, train_lincls
from hnmix.evaluate.splits import load_eval_splits
from launch import REPO, accelerate_launch
from tiny_run import TINY, run_train

# test_resnet at 32 px, one process, no workers.
SMALL = ["test_resnet", "--dataset", "synthetic", "-i", "32", "--batch_size", "64", "--num_workers", "0", "--seed", "0"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def read_report(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- lincls


def test_lincls_learns_separable_synthetic_data_and_saves_its_classifier(tmp_path, capsys):
    # Where 60 comes from: this setting (200 images per split, 5 epochs, lr 2, cosine, batch 32), run
    # with --seed 0..5 (each seed: another random-init network, other images, other crops), scored
    # 84.5, 87.5, 89.0, 76.0, 95.5 and 80.5% top-1 on the 200 test images; chance is 10%. A classifier
    # that is right 76% of the time scores under 60% on 200 images with probability < 1e-6 (binomial).
    lincls_dir = tmp_path / "lincls"
    code, err = run_cli(capsys, *SMALL, "--synthetic_size", "200", "--protocol", "lincls", "--lincls_epochs", "5",
                        "--lincls_lr", "2", "--lincls_schedule", "cosine", "--lincls_batch_size", "32",
                        "--lincls_dir", str(lincls_dir))
    assert code == 0, err
    report = read_report(lincls_dir / "evaluation_lincls.json")  # a timm model: the JSON goes beside the classifier
    assert report["lincls_top1"] > 60 and report["lincls_top1"] <= report["lincls_top5"]
    assert report["lincls_test_images"] == 200 and report["lincls_epochs_done"] == 5
    dataset = report["dataset"]
    assert (dataset["train"], dataset["test"]) == ("synthetic split train", "synthetic split test")  # which split
    assert dataset["sizes"] == {"train": 200, "test": 200}
    assert report["settings"]["lincls_lr"] == 2.0 and report["settings"]["lincls_schedule"] == "cosine"

    classifier = load_file(lincls_dir / "classifier.safetensors")
    assert classifier["weight"].shape == (10, 96) and classifier["bias"].shape == (10,)
    epochs = [json.loads(line) for line in (lincls_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4]
    # Per-epoch cosine: lr * (1 + cos(pi * epoch / 5)) / 2.
    np.testing.assert_allclose([e["lr"] for e in epochs], [2 * (1 + np.cos(np.pi * e / 5)) / 2 for e in range(5)])
    assert sorted(p.name for p in lincls_dir.iterdir() if p.name.startswith("epoch_")) == ["epoch_0005"]  # newest only


def test_moco_defaults_and_the_step_schedule():
    settings = LinclsSettings()
    assert (settings.epochs, settings.lr, settings.batch_size, settings.weight_decay, settings.momentum) == \
        (100, 30.0, 256, 0.0, 0.9)
    # moco/main_lincls.py: lr 30 until epoch 60, 3 until 80, then 0.3.
    assert [settings.lr_at(e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


def test_lincls_leaves_the_backbone_weights_and_batchnorm_statistics_alone(tmp_path):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0).train()  # a train-mode forward would move BN stats
    before = {name: t.clone() for name, t in backbone.state_dict().items()}  # weights, running stats, counters
    splits = load_eval_splits("synthetic", synthetic_size=40, seed=0, with_test=True)
    columns = dict(image_column="image", label_column="label", img_size=32)
    settings = LinclsSettings(epochs=2, lr=1.0, batch_size=8, seed=0)
    rng = torch.get_rng_state()
    result = train_lincls(backbone, AugmentedImages(splits.train, **columns, seed=0), EvalImages(splits.reported, **columns),
                          accelerator, num_classes=10, settings=settings, lincls_dir=tmp_path / "lincls",
                          resume_from=None, identity=settings.identity(), num_workers=0, eval_batch_size=16)
    assert result["lincls_epochs_done"] == 2 and result["lincls_train_loss"] is not None
    after = backbone.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert all(p.grad is None for p in backbone.parameters())  # no gradient reached it
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())  # given back as it came
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is not consumed
    trained = load_file(tmp_path / "lincls" / "classifier.safetensors")
    assert not torch.equal(trained["bias"], torch.zeros(10))  # the classifier itself did train


def test_a_resumed_run_ends_with_the_classifier_of_an_uninterrupted_one(tmp_path, capsys):
    run = [*SMALL, "--synthetic_size", "40", "--protocol", "lincls", "--lincls_epochs", "4", "--lincls_lr", "1",
           "--lincls_batch_size", "8"]  # step schedule: lr 1, 1, 0.1, 0.01 (x0.1 at epochs 2 and 3)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(capsys, *run, "--lincls_dir", str(whole))[0] == 0
    code, err = run_cli(capsys, *run, "--lincls_dir", str(parts), "--lincls_stop_at", "2")
    assert code == 0, err
    assert read_report(parts / "evaluation_lincls.json")["lincls_epochs_done"] == 2
    code, err = run_cli(capsys, *run, "--lincls_dir", str(parts), "--resume")
    assert code == 0, err

    expected, resumed = load_file(whole / "classifier.safetensors"), load_file(parts / "classifier.safetensors")
    assert all(torch.equal(expected[name], resumed[name]) for name in ("weight", "bias"))  # bit for bit
    assert (whole / "metrics.jsonl").read_text() == (parts / "metrics.jsonl").read_text()  # the same epochs
    one, two = read_report(whole / "evaluation_lincls.json"), read_report(parts / "evaluation_lincls.json")
    assert (one["lincls_top1"], one["lincls_top5"]) == (two["lincls_top1"], two["lincls_top5"])
    assert two["settings"]["lincls_resumed"] and two["lincls_epochs_done"] == 4

    # A finished run resumed is only evaluated again; a fresh start or other settings would lose the saved run.
    metrics = (whole / "metrics.jsonl").read_text()
    assert run_cli(capsys, *run, "--lincls_dir", str(whole), "--resume")[0] == 0
    assert (whole / "metrics.jsonl").read_text() == metrics
    assert read_report(whole / "evaluation_lincls.json")["lincls_top1"] == one["lincls_top1"]
    code, err = run_cli(capsys, *run, "--lincls_dir", str(whole))
    assert code == 2 and "already holds a lincls run (4 of 4 epochs); pass --resume" in err
    code, err = run_cli(capsys, *run, "--lincls_dir", str(whole), "--resume", "--lincls_lr", "3")
    assert code == 2 and "had other settings (lr 1.0 -> 3.0)" in err


def test_a_resume_on_an_encoder_exported_again_since_is_refused(tmp_path, capsys):
    # The classifier was trained on the first export's features: resumed on new weights it would report
    # the old classifier's accuracy (e.g. 91.8 with 0 epochs trained).
    from hnmix.hub.export import export_encoder

    encoder, lincls_dir = tmp_path / "run" / "encoder", tmp_path / "lincls"
    torch.manual_seed(0)
    export_encoder(timm.create_model("test_resnet", num_classes=0), encoder, img_size=32)
    run = [str(encoder), *SMALL[1:], "--synthetic_size", "20", "--protocol", "lincls", "--lincls_epochs", "2",
           "--lincls_batch_size", "8", "--lincls_dir", str(lincls_dir)]
    code, err = run_cli(capsys, *run, "--lincls_stop_at", "1")
    assert code == 0, err
    assert run_cli(capsys, *run, "--resume", "--lincls_stop_at", "1")[0] == 0  # the same weights: resumed
    torch.manual_seed(1)
    export_encoder(timm.create_model("test_resnet", num_classes=0), encoder, img_size=32)  # trained further
    code, err = run_cli(capsys, *run, "--resume")
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("hnmix: error: ")]
    assert line == (f"hnmix: error: {lincls_dir} holds a linear classifier of other backbone weights (the model was "
                    f"exported or trained again since, or is another one); delete {lincls_dir} or pass another "
                    "--lincls_dir to start afresh")
    assert json.loads((lincls_dir / "epoch_0001" / "lincls_state.json").read_text())["epochs_done"] == 1  # untouched


def test_an_unreadable_training_image_adds_no_loss_and_is_counted(tmp_path, capsys):
    splits = {name: make_synthetic_dataset(20, seed=seed, image_size=32)
              for seed, name in enumerate(("train", "validation", "test"))}
    train = splits["train"].cast_column("image", datasets.Image(decode=False)).to_dict()
    train["image"][3] = {"bytes": b"not an image", "path": "broken.png"}
    splits["train"] = datasets.Dataset.from_dict(train, features=splits["train"].features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    code, err = run_cli(capsys, "test_resnet", "--dataset", str(tmp_path / "data"), "-i", "32", "--num_workers", "0",
                        "--protocol", "lincls", "--lincls_epochs", "2", "--lincls_batch_size", "8",
                        "--lincls_lr", "1", "--lincls_dir", str(tmp_path / "lincls"))
    assert code == 0, err
    epochs = [json.loads(line) for line in (tmp_path / "lincls" / "metrics.jsonl").read_text().splitlines()]
    assert [e["bad_samples"] for e in epochs] == [1, 1] and all(np.isfinite(e["loss"]) for e in epochs)
    report = read_report(tmp_path / "lincls" / "evaluation_lincls.json")
    assert report["lincls_test_images"] == 20 and report["eval_bad_samples"] == 0


@pytest.mark.multiprocess
def test_lincls_on_two_processes_gives_every_rank_the_same_numbers(tmp_path):
    script = REPO / "tests" / "multiprocess" / "lincls_two_ranks.py"
    done = accelerate_launch([str(script), str(tmp_path)], env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [read_report(tmp_path / f"rank{r}.json") for r in range(2)]
    assert [rank["world"] for rank in ranks] == [2, 2]
    numbers = [{k: v for k, v in rank["report"].items() if k.startswith("lincls_")} for rank in ranks]
    assert numbers[0] == numbers[1]  # top-1, top-5, train loss, epochs
    assert numbers[0]["lincls_test_images"] == 37  # gathered once each: Accelerate's padding dropped
    assert ranks[0]["report"]["settings"]["num_processes"] == 2 and numbers[0]["lincls_epochs_done"] == 2
    saved = sorted(p.name for p in (tmp_path / "lincls" / "epoch_0002").iterdir())  # written by the main process
    assert saved == ["classifier.safetensors", "lincls_state.json", "optimizer.safetensors"]
    assert read_report(tmp_path / "report.json")["lincls_top1"] == numbers[0]["lincls_top1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--protocol", "lincls"], "--protocol lincls on test_resnet (random init) needs --lincls_dir DIR"),
        (["--protocol", "lincls", "--lincls_dir", "L", "--lincls_epochs", "0"], "lincls_epochs must be >= 1"),
        (["--protocol", "lincls", "--lincls_dir", "L", "--lincls_lr", "-1"], "lincls_lr must be a positive number"),
        (["--protocol", "lincls", "--lincls_dir", "L", "--lincls_batch_size", "0"], "must be a positive multiple"),
        (["--protocol", "lincls", "--lincls_dir", "L", "--lincls_epochs", "3", "--lincls_stop_at", "4"],
         "lincls_stop_at must lie in 1..3"),
        (["--protocol", "lincls", "--lincls_dir", "L", "--resume"], "--resume: no saved lincls state under"),
        (["--protocol", "lincls", "--lincls_dir", "FILE"], "(not a writable directory); pass --lincls_dir DIR"),
        (["--protocol", "knn", "--resume"], "belong to --protocol lincls"),
    ],
)
def test_bad_lincls_options_give_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    code, err = run_cli(capsys, *SMALL, "--synthetic_size", "20", *argv)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("hnmix: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and message in errors[0], err
    assert not (tmp_path / "L").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- the fast probe's selection split


def one_split_synthetic(folder: Path, size: int) -> str:
    """A save_to_disk Dataset of synthetic images (train split only) with an `id` column."""
    dataset = make_synthetic_dataset(size, seed=0, image_size=32)
    dataset.add_column("id", list(range(size))).save_to_disk(str(folder))
    return str(folder)


def test_the_linear_probe_never_selects_on_the_split_it_reports(tmp_path, capsys):
    source = one_split_synthetic(tmp_path / "data", 100)
    splits = load_eval_splits(source, eval_split_size=20, seed=3, with_selection=True)
    train, selection, reported = (set(d["id"]) for d in (splits.train, splits.selection, splits.reported))
    assert splits.test is None and splits.reported is splits.held_out  # no test split: the held-out part is reported
    assert not (train & selection or train & reported or selection & reported)
    assert train | selection | reported == set(range(100))
    assert np.bincount(splits.selection["label"]).tolist() == [2] * 10  # 20 of the 80 left, stratified
    assert np.bincount(splits.reported["label"]).tolist() == [2] * 10
    # The trainer's monitor still sees the train split minus its held-out part only.
    assert len(load_eval_splits(source, eval_split_size=20, seed=3).train) == 80
    # With a test split, the held-out (validation) split selects and test is reported.
    with_test = load_eval_splits("synthetic", synthetic_size=20, seed=0, with_selection=True)
    assert (with_test.selection_source, with_test.reported_source) == ("synthetic split validation", "synthetic split test")

    code, err = run_cli(capsys, "test_resnet", "--dataset", source, "-i", "32", "--num_workers", "0",
                        "--eval_split_size", "20", "--seed", "3", "--protocol", "linear", "--linear_epochs", "2",
                        "--json", str(tmp_path / "linear.json"))
    assert code == 0, err
    dataset = read_report(tmp_path / "linear.json")["dataset"]
    assert dataset["sizes"] == {"train": 60, "selection": 20, "test": 20}
    assert "second stratified part" in dataset["selection"] and "held-out part" in dataset["test"]
    assert "is reported" in dataset["test"]


# ----------------------------------------------------------------------------- an exported encoder's run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """DIR_OUT of 4 steps of the real trainer on synthetic data at 32 px (64 images)."""
    dir_out = tmp_path_factory.mktemp("run")
    done = run_train(*TINY, "-s", "4", "--num_workers", "0", "-do", str(dir_out))
    assert done.returncode == 0, done.stderr[-3000:]
    return dir_out


def test_an_exported_encoder_is_evaluated_on_its_runs_dataset_and_image_size(tiny_run, tmp_path, capsys):
    code, err = run_cli(capsys, str(tiny_run / "encoder"), "--num_workers", "0", "--knn_k", "5")  # no --dataset
    assert code == 0, err
    report = read_report(tiny_run / "encoder" / "evaluation_knn.json")
    assert report["dataset"]["source"] == "synthetic"  # not Caltech-256 on the Hub
    assert report["dataset"]["sizes"]["train"] == 64  # the run's synthetic_size, not the default 512
    assert report["settings"]["img_size"] == 32 and report["settings"]["seed"] == 69420
    assert report["model"]["run_config"] == str(tiny_run / "config.yaml")

    # A copy of the folder alone: the model card says what the run used (dataset, split, image size).
    copy = shutil.copytree(tiny_run / "encoder", tmp_path / "copy" / "encoder")
    (tmp_path / "copy" / "config.yaml").write_text(yaml.safe_dump({"arch": "resnet50", "dataset": "elsewhere"}))
    code, err = run_cli(capsys, str(copy), "--num_workers", "0", "--knn_k", "5", "--synthetic_size", "24")
    assert code == 0, err
    report = read_report(copy / "evaluation_knn.json")
    assert report["model"]["run_config"] == str(copy / "README.md")  # another model's config.yaml is not taken
    assert report["dataset"]["source"] == "synthetic" and report["dataset"]["split"] == "train"
    assert report["settings"]["img_size"] == 32
