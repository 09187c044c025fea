"""hnmix.evaluate: kNN and linear-probe math, evaluation splits, features on 2 real processes, the CLI."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.errors import DataError
from hnmix.evaluate.cli import main
from hnmix.evaluate.features import EvalImages, extract_features, make_eval_loader
from hnmix.evaluate.models import load_backbone
from hnmix.evaluate.probes import knn_accuracy, knn_scores, train_linear_probe
from hnmix.evaluate.splits import NO_LABELS, load_eval_splits
from hnmix.hub.export import export_encoder
from launch import REPO, accelerate_launch

TINY_DATA = ["--dataset", "synthetic", "--synthetic_size", "24", "--img_size", "32", "--batch_size", "8",
             "--num_workers", "0"]


# ----------------------------------------------------------------------------- kNN


def knn_scores_oracle(bank, bank_labels, queries, *, num_classes, k, temperature):
    """Materialising float64 weighted kNN, one query at a time."""
    bank = torch.nn.functional.normalize(bank.double(), dim=1)
    queries = torch.nn.functional.normalize(queries.double(), dim=1)
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for i, query in enumerate(queries):
        similarity = bank @ query
        for j in similarity.argsort(descending=True)[: min(k, len(bank))]:
            scores[i, bank_labels[j]] += math.exp(similarity[j].item() / temperature)
    return scores


def at_degrees(*angles: float) -> torch.Tensor:
    """[n, 2] unit vectors at these angles: cosine similarity = cos(difference of angles)."""
    radians = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1).float()


def test_knn_on_separated_clusters_is_always_right():
    # Three classes at 0, 120 and 240 degrees, 4 bank entries each within +-6 degrees, queries within +-10.
    bank = at_degrees(*[centre + offset for centre in (0, 120, 240) for offset in (-6, -2, 2, 6)])
    bank_labels = torch.arange(3).repeat_interleave(4)
    queries = at_degrees(10, -10, 125, 115, 250, 230)
    query_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # The 4 nearest neighbours of each query are its own class's 4 entries (>= 104 degrees from the rest).
    result = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=3, k=4, temperature=0.1)
    assert result == {"knn_top1": 100.0, "knn_top5": 100.0}
    scores = knn_scores(bank * 7.0, bank_labels, queries * 0.5, num_classes=3, k=4)  # cosine: scale-free
    torch.testing.assert_close(scores.double(), knn_scores_oracle(bank, bank_labels, queries, num_classes=3, k=4,
                                                                  temperature=0.1), rtol=1e-5, atol=0)


def test_knn_weights_votes_by_similarity_and_ranks_classes_for_top5():
    # One query direction (0 degrees). Bank: class c in 1..6 at 5c degrees, class 0 at 90 degrees.
    bank = at_degrees(90, 5, 10, 15, 20, 25, 30)
    bank_labels = torch.arange(7)
    queries = at_degrees(0, 0, 0, 0)
    # With k = 6 the neighbours are classes 1..6, ranked 1 (5 deg) to 6 (30 deg); class 0 gets no vote.
    # Label 1: top-1. Label 5: 5th of the ranking, top-5 only. Label 6: 6th, missed. Label 0: missed.
    query_labels = torch.tensor([1, 5, 6, 0])
    result = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=7, k=6, temperature=0.1)
    assert result == {"knn_top1": 25.0, "knn_top5": 50.0}
    # k larger than the bank (7 entries) uses all of it: class 0 now gets exp(cos 90deg / 0.1) = 1, still last.
    scores = knn_scores(bank, bank_labels, queries, num_classes=7, k=200)
    torch.testing.assert_close(scores[0, 0], torch.tensor(1.0))
    torch.testing.assert_close(scores, knn_scores(bank, bank_labels, queries, num_classes=7, k=7), rtol=0, atol=0)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=7, k=200) == result


def test_knn_two_near_votes_outweigh_one_exact_match():
    # Query at 0 degrees, label 0. Bank: class 0 at 0 degrees, class 1 at -10 and +10 degrees.
    bank = at_degrees(0, -10, 10)
    bank_labels = torch.tensor([0, 1, 1])
    queries, query_labels = at_degrees(0), torch.tensor([0])
    # k = 1: only the exact match votes. k = 3: class 1 scores 2 exp(cos(10 deg) / 0.1) = 37834 > exp(10) = 22026.
    assert 2 * math.exp(math.cos(math.radians(10)) / 0.1) > math.exp(1 / 0.1)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=2, k=1)["knn_top1"] == 100.0
    assert knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=2, k=3)["knn_top1"] == 0.0
    # A colder temperature lets the exact match win again: exp(1 / 0.01) > 2 exp(cos(10 deg) / 0.01).
    assert knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=2, k=3, temperature=0.02)["knn_top1"] == 100.0


def test_knn_scores_do_not_depend_on_the_chunk_size():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 16, generator=generator), torch.randn(137, 16, generator=generator)
    bank_labels = torch.randint(0, 5, (50,), generator=generator)
    by_chunk = {size: knn_scores(bank, bank_labels, queries, num_classes=5, k=10, chunk_size=size) for size in (1, 7, 100, 1024)}
    assert all(torch.equal(scores, by_chunk[1024]) for scores in by_chunk.values())
    oracle = knn_scores_oracle(bank, bank_labels, queries, num_classes=5, k=10, temperature=0.1)
    torch.testing.assert_close(by_chunk[1024].double(), oracle, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separates_separable_features_and_picks_from_the_grid():
    generator = torch.Generator().manual_seed(0)

    def features(n):  # class c: a bump of 3 on dimension c of 8, plus noise of std 0.3
        labels = torch.randint(0, 6, (n,), generator=generator)
        return torch.nn.functional.one_hot(labels, 8).float() * 3 + 0.3 * torch.randn(n, 8, generator=generator), labels

    lrs, weight_decays = (1e-3, 1e-2), (0.0, 1e-3)
    result = train_linear_probe(*features(240), *features(60), *features(60), num_classes=6, lrs=lrs,
                                weight_decays=weight_decays, epochs=5, batch_size=32)
    assert result["linear_top1"] == 100.0 and result["linear_top5"] == 100.0
    assert result["linear_best_lr"] in lrs and result["linear_best_weight_decay"] in weight_decays
    grid = result["linear_grid"]
    assert [(g["lr"], g["weight_decay"]) for g in grid] == [(lr, wd) for lr in lrs for wd in weight_decays]
    assert result["linear_val_top1"] == max(g["val_top1"] for g in grid)
    best = next(g for g in grid if g["val_top1"] == result["linear_val_top1"])  # ties go to the first
    assert (best["lr"], best["weight_decay"]) == (result["linear_best_lr"], result["linear_best_weight_decay"])


def test_linear_probe_on_random_labels_is_near_chance_and_deterministic():
    generator = torch.Generator().manual_seed(1)

    def noise(n):
        return torch.randn(n, 32, generator=generator), torch.randint(0, 4, (n,), generator=generator)

    train, val, test = noise(400), noise(200), noise(400)
    first = train_linear_probe(*train, *val, *test, num_classes=4, epochs=3, batch_size=64)
    assert 12.5 < first["linear_top1"] < 37.5  # chance is 25%; 400 test samples give a std of ~2.2 points
    assert first == train_linear_probe(*train, *val, *test, num_classes=4, epochs=3, batch_size=64)


# ----------------------------------------------------------------------------- splits


def one_split_dataset(folder: Path, class_counts: list[int]) -> str:
    """A save_to_disk Dataset (train split only) with plain int64 labels and an `id` column."""
    labels = [c for c, count in enumerate(class_counts) for _ in range(count)]
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    dataset = datasets.Dataset.from_dict(
        {"image": [image] * len(labels), "label": labels, "id": list(range(len(labels)))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "id": datasets.Value("int64")}),
    )
    dataset.save_to_disk(str(folder))
    return str(folder)


def test_without_a_validation_split_the_held_out_part_is_stratified_and_fixed(tmp_path):
    source = one_split_dataset(tmp_path / "data", [10, 20, 30])
    splits = load_eval_splits(source, eval_split_size=0.2, seed=3)
    held_out, rest = splits.held_out, splits.train
    assert np.bincount(held_out["label"]).tolist() == [2, 4, 6]  # 20% of each class
    assert np.bincount(rest["label"]).tolist() == [8, 16, 24]
    assert sorted(list(held_out["id"]) + list(rest["id"])) == list(range(60))
    assert "stratified" in splits.held_out_source and splits.num_classes == 3
    assert list(load_eval_splits(source, eval_split_size=0.2, seed=3).held_out["id"]) == list(held_out["id"])
    assert list(load_eval_splits(source, eval_split_size=0.2, seed=4).held_out["id"]) != list(held_out["id"])
    by_count = load_eval_splits(source, eval_split_size=12, seed=3, with_test=True)
    assert np.bincount(by_count.held_out["label"]).tolist() == [2, 4, 6] and by_count.test is None
    bounded = load_eval_splits(source, eval_split_size=0.2, seed=3, max_samples=5)
    assert (len(bounded.train), len(bounded.held_out)) == (5, 5)
    assert set(bounded.held_out["id"]) <= set(held_out["id"])


def test_a_validation_split_is_the_held_out_split_and_test_is_used_when_asked():
    splits = load_eval_splits("synthetic", synthetic_size=20, seed=0, with_test=True)
    assert (splits.held_out_source, splits.test_source) == ("synthetic split validation", "synthetic split test")
    assert splits.sizes(("train", "held_out", "test")) == {"train": 20, "held_out": 20, "test": 20}
    assert splits.sizes() == {"train": 20, "held_out": 20}  # the kNN monitor's roles


def test_an_unlabelled_test_split_counts_as_missing(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    png = {"bytes": buffer.getvalue(), "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [png] * 6, "label": [0, 1, 2] * 2}, features=features),
        "validation": datasets.Dataset.from_dict({"image": [png] * 3, "label": [0, 1, 2]}, features=features),
        "test": datasets.Dataset.from_dict({"image": [png] * 3, "label": [-1] * 3}, features=features),
    }).save_to_disk(str(tmp_path / "dict"))
    splits = load_eval_splits(str(tmp_path / "dict"), with_test=True)
    assert splits.test is None and splits.held_out_source.endswith("split validation")
    reported = f"{tmp_path / 'dict'} split validation (no test split: the held-out split is reported)"
    assert splits.describe(("train", "test"))["test"] == reported
    assert splits.num_classes == 3


def test_evaluation_without_labels_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="needs a label column"):
        load_eval_splits("synthetic", synthetic_size=20, label_column="none")
    with pytest.raises(DataError, match="stratified"):
        load_eval_splits(one_split_dataset(tmp_path / "data", [1, 5]), eval_split_size=0.3)  # one image in class 0


# ----------------------------------------------------------------------------- features


def test_extraction_on_one_process_matches_the_backbone_and_leaves_training_state_alone():
    accelerator = Accelerator(cpu=True)
    dataset = make_synthetic_dataset(13, seed=0, image_size=32)  # 13: the last batch of 4 is short
    images = EvalImages(dataset, image_column="image", label_column="label", img_size=32)
    loader = accelerator.prepare(make_eval_loader(images, batch_size=4, num_workers=0))
    backbone = timm.create_model("test_resnet", num_classes=0).train()
    buffers = {name: b.clone() for name, b in backbone.named_buffers()}
    rng = torch.get_rng_state()
    features, labels = extract_features(backbone, loader, accelerator)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random draws are not shifted by an evaluation
    assert backbone.training and all(torch.equal(b, buffers[name]) for name, b in backbone.named_buffers())
    assert features.dtype == torch.float32 and labels.tolist() == list(dataset["label"])
    with torch.no_grad():
        expected = backbone.eval()(torch.stack([images[i][0] for i in range(13)]))
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- command line


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_knn_on_a_random_init_timm_model(tmp_path, capsys):
    code, out, err = run_cli(capsys, "test_resnet", *TINY_DATA, "--knn_k", "5", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= report["knn_top5"] <= 100 and 0 <= report["knn_top1"] <= report["knn_top5"]
    assert report["model"]["kind"] == "timm" and report["dataset"]["sizes"] == {"train": 24, "held_out": 24}
    assert report["settings"]["knn_k"] == 5 and report["settings"]["num_processes"] == 1
    assert "knn_top1" in out  # the table


def test_cli_linear_on_an_exported_encoder(tmp_path, capsys):
    encoder = export_encoder(timm.create_model("test_resnet", num_classes=0), tmp_path / "encoder", img_size=32)
    code, _, err = run_cli(capsys, str(encoder), *TINY_DATA, "--protocol", "linear", "--linear_epochs", "2")
    assert code == 0, err
    report = json.loads((encoder / "evaluation_linear.json").read_text())  # the default place
    assert 0 <= report["linear_top1"] <= 100 and report["linear_best_lr"] in (1e-3, 1e-2)
    assert report["model"]["kind"] == "encoder" and report["settings"]["img_size"] == 32
    assert report["dataset"]["sizes"] == {"train": 24, "selection": 24, "test": 24}
    assert (report["dataset"]["selection"], report["dataset"]["test"]) == ("synthetic split validation",
                                                                         "synthetic split test")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Two steps of the real trainer: a checkpoint and an exported encoder of the same weights."""
    dir_out = tmp_path_factory.mktemp("run")
    command = [sys.executable, "-m", "hnmix.train", "--dataset", "synthetic", "--synthetic_size", "64", "-a",
               "test_resnet", "-i", "32", "-bs", "8", "-dm", "16", "-km", "64", "-nh", "8", "-s1h", "4", "-s2h",
               "4", "-st1h", "0", "-st2h", "0", "-s", "2", "-sp", "1", "-ss", "2", "--num_workers", "0",
               "-do", str(dir_out)]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dir_out


def test_cli_on_a_trainer_checkpoint_uses_its_backbone_and_config(trained_run, capsys):
    checkpoint = trained_run / "checkpoints" / "step_00000002"
    loaded = load_backbone(str(checkpoint)).backbone.eval()
    weights = load_file(checkpoint / "model.safetensors")
    by_hand = timm.create_model("test_resnet", num_classes=0).eval()
    by_hand.load_state_dict({k.removeprefix("encoder_q.backbone."): v for k, v in weights.items()
                             if k.startswith("encoder_q.backbone.")})
    exported = timm.create_model(f"local-dir:{trained_run / 'encoder'}", pretrained=True).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), by_hand(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(images), exported(images), rtol=0, atol=1e-6)

    code, _, err = run_cli(capsys, str(checkpoint), "--num_workers", "0")  # dataset, size, seed: from config.yaml
    assert code == 0, err
    report = json.loads((checkpoint / "evaluation_knn.json").read_text())
    assert 0 <= report["knn_top1"] <= 100 and 0 <= report["knn_top5"] <= 100
    assert report["dataset"]["source"] == "synthetic" and report["dataset"]["sizes"]["train"] == 64
    assert report["settings"]["img_size"] == 32 and report["settings"]["seed"] == 69420


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/no/such/run/checkpoints/step_1"], "model path /no/such/run/checkpoints/step_1 does not exist"),
        (["resnet_nonexistent"], "unknown model 'resnet_nonexistent'"),
        (["someone/no-such-model"], "cannot load the Hub model someone/no-such-model from the Hugging Face Hub"),
        (["hf-hub:someone/no-such-model"], "cannot load the Hub model someone/no-such-model"),
        (["test_resnet", "--pretrained"], "cannot load timm's pretrained weights of test_resnet"),
        (["test_resnet", *TINY_DATA, "--label_column", "none"], NO_LABELS),
        (["test_resnet", *TINY_DATA, "--split", "nope"], "split 'nope' does not exist"),
        (["test_resnet", *TINY_DATA, "--eval_split_size", "1.5"], "eval_split_size must be"),
        (["test_resnet", *TINY_DATA, "--json", "/proc/no.json"], "cannot write the results to /proc/no.json"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_code_2(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("hnmix: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and message in errors[0], err


def test_a_directory_that_is_neither_checkpoint_nor_encoder_points_to_both(trained_run, capsys):
    code, _, err = run_cli(capsys, str(trained_run))
    assert code == 2 and "pass DIR_OUT/checkpoints/step_N or DIR_OUT/encoder" in err and "found" in err


# ----------------------------------------------------------------------------- two processes


@pytest.mark.multiprocess
def test_two_processes_count_every_sample_once_and_agree(tmp_path, capsys):
    script = REPO / "tests" / "multiprocess" / "evaluate_two_ranks.py"
    done = accelerate_launch([str(script), str(tmp_path)], env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["labels"] == list(range(37))  # every sample once, in dataset order, padding dropped
        assert rank["num_features"] == [37, 96]
        assert rank["training_restored"] and rank["buffers_restored"] and rank["rng_untouched"]
        assert rank["cli_rc"] == 0
    assert ranks[0]["monitor"] == ranks[1]["monitor"]
    saved = torch.load(tmp_path / "rank0.pt")
    # Rank 1 held other BatchNorm statistics; the gathered features are rank 0's model's, row for row.
    torch.testing.assert_close(saved["gathered"], saved["alone"], rtol=0, atol=1e-5)
    monitor = dict(ranks[0]["monitor"])
    # The record's counts are of the gathered images: each sample once, Accelerate's padding dropped.
    assert (monitor.pop("knn_split"), monitor.pop("knn_bank"), monitor.pop("knn_queries")) == ("validation", 37, 37)
    assert monitor == saved["monitor_alone"]

    # The CLI on 2 processes gives what it gives on one.
    spec = importlib.util.spec_from_file_location("evaluate_two_ranks", script)
    cli_args = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_args)
    two = json.loads((tmp_path / "cli.json").read_text())
    code, _, err = run_cli(capsys, *cli_args.CLI_ARGS, "--json", str(tmp_path / "one.json"))
    assert code == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["settings"]["num_processes"] == 2 and one["settings"]["num_processes"] == 1
    assert (two["knn_top1"], two["knn_top5"], two["dataset"]) == (one["knn_top1"], one["knn_top5"], one["dataset"])
