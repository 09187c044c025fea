"""hnmix.evaluate.monitor on one process: the loaders it builds from the splits, the kNN it scores
with its own k and temperature, the split and counts it reports, the features it compares, and the
unreadable images it reports."""

from __future__ import annotations

import io
import math

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from hnmix.evaluate.features import EvalImages
from hnmix.evaluate.monitor import KNN_FEATURES, KnnMonitor, broadcast_from_main
from hnmix.evaluate.probes import knn_accuracy
from hnmix.evaluate.splits import EvalSplits
from hnmix.moco import MoCoEncoder

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def png(rgb):
    """{"bytes", "path"} of an 8x8 image of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def split(rows):
    """A Dataset of (colour or raw image dict, label) rows."""
    images = [row if isinstance(row, dict) else png(row) for row, _ in rows]
    return datasets.Dataset.from_dict({"image": images, "label": [label for _, label in rows]}, features=FEATURES)


# Bank: class 0 reddish, class 1 greenish, class 2 bluish. The first query is right with k = 3
# only, the third with temperature 0.5 only (checked below).
BANK = [((200, 20, 20), 0), ((180, 60, 40), 0), ((20, 200, 20), 1), ((60, 180, 40), 1), ((90, 150, 30), 1),
        ((20, 20, 200), 2), ((40, 60, 180), 2)]
QUERIES = [((29, 81, 82), 2), ((241, 209, 159), 0), ((139, 118, 8), 0), ((20, 20, 200), 2)]


def mean_colour():
    """A backbone whose features are the mean of each channel: [B, 3, S, S] -> [B, 3]."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def splits_of(held_out):
    return EvalSplits(train=split(BANK), held_out=held_out, test=None, image_column="image", label_column="label",
                      num_classes=3, train_source="bank", held_out_source="queries", test_source=None,
                      held_out_name="queries split")


def features_by_hand(dataset):
    """(features [N, 3], labels [N]) of the readable rows, one image at a time."""
    images = EvalImages(dataset, image_column="image", label_column="label", img_size=8)
    pairs = [images[i] for i in range(len(dataset))]
    pairs = [(image, label) for image, label in pairs if label >= 0]
    return torch.stack([image.mean((1, 2)) for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def test_monitor_scores_the_held_out_images_against_the_train_bank_with_its_k_and_temperature():
    accelerator = Accelerator(cpu=True)
    monitor = KnnMonitor.from_splits(splits_of(split(QUERIES)), accelerator, img_size=8, batch_size=3,
                                     num_workers=0, k=3, temperature=0.5)
    assert len(monitor.bank_loader.dataset) == len(BANK) and len(monitor.query_loader.dataset) == len(QUERIES)
    assert monitor.num_classes == 3
    result = monitor.evaluate(mean_colour(), accelerator)
    bank, queries = features_by_hand(split(BANK)), features_by_hand(split(QUERIES))
    expected = knn_accuracy(*bank, *queries, num_classes=3, k=3, temperature=0.5)
    # The record says which split it scored and how many images made the bank and the queries.
    assert result == expected | {"knn_split": "queries split", "knn_bank": len(BANK), "knn_queries": len(QUERIES)}
    assert expected["knn_top1"] == 100.0
    # The check discriminates: another k, or another temperature, score these queries otherwise.
    assert knn_accuracy(*bank, *queries, num_classes=3, k=7, temperature=0.5)["knn_top1"] < 100.0
    assert knn_accuracy(*bank, *queries, num_classes=3, k=3, temperature=0.1)["knn_top1"] < 100.0


def test_monitor_reports_the_unreadable_held_out_images_it_left_out():
    broken = {"bytes": b"not an image", "path": None}
    accelerator = Accelerator(cpu=True)
    monitor = KnnMonitor.from_splits(splits_of(split([*QUERIES, (broken, 1)])), accelerator, img_size=8,
                                     batch_size=4, num_workers=0, k=3, temperature=0.5)
    result = monitor.evaluate(mean_colour(), accelerator)
    assert result.pop("eval_bad_samples") == 1
    assert (result.pop("knn_bank"), result.pop("knn_queries")) == (len(BANK), len(QUERIES))  # the images scored
    result.pop("knn_split")
    bank, queries = features_by_hand(split(BANK)), features_by_hand(split(QUERIES))
    assert result == knn_accuracy(*bank, *queries, num_classes=3, k=3, temperature=0.5)


def test_one_process_broadcasts_its_own_value():
    value = {"knn_top1": 12.5}
    assert broadcast_from_main(value, Accelerator(cpu=True)) is value


def test_monitor_reports_unreadable_images_of_both_splits_together():
    broken = {"bytes": b"not an image", "path": None}
    accelerator = Accelerator(cpu=True)
    splits = splits_of(split([*QUERIES, (broken, 1)]))
    splits.train = split([*BANK, (broken, 0)])
    monitor = KnnMonitor.from_splits(splits, accelerator, img_size=8, batch_size=4, num_workers=0, k=3,
                                     temperature=0.5)
    assert monitor.evaluate(mean_colour(), accelerator)["eval_bad_samples"] == 2


def at_degrees(*angles):
    """[n, 2] unit vectors at these angles in degrees."""
    radians = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1).float()


def loader(features, labels, accelerator):
    dataset = torch.utils.data.TensorDataset(features, labels)
    return accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False))


def test_monitor_defaults_are_the_knns_k_200_and_temperature_0_1():
    """Features are the "images" themselves (an identity backbone). The bank of 201 makes k = 200
    and k = 201 disagree, the second query temperature 0.1 and a warmer one (as in
    test_knn_arguments.py): query 0 is right with k = 200, query 1 at temperature 0.1 only."""
    accelerator = Accelerator(cpu=True)
    bank = torch.cat([at_degrees(*[5] * 99, 30, *[-5] * 99, 31, 32), at_degrees(90, 115, 65)])
    bank_labels = torch.tensor([1] * 100 + [0] * 101 + [3, 2, 2])
    queries, query_labels = at_degrees(0, 90), torch.tensor([1, 3])
    monitor = KnnMonitor(loader(bank, bank_labels, accelerator), loader(queries, query_labels, accelerator),
                         num_classes=4)
    assert monitor.evaluate(nn.Identity(), accelerator)["knn_top1"] == 100.0
    assert knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=4, k=201)["knn_top1"] == 50.0
    assert knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=4, temperature=1.0)["knn_top1"] == 50.0
    built = KnnMonitor.from_splits(splits_of(split(QUERIES)), accelerator, img_size=8, batch_size=3, num_workers=0)
    assert (built.k, built.temperature) == (200, 0.1)


class TwoProcesses:
    """Stands in for the Accelerator of process 1 of 2."""

    num_processes = 2


def test_several_processes_take_the_main_processs_value(monkeypatch):
    calls = []

    def broadcast_object_list(objects, from_process):
        calls.append((list(objects), from_process))
        return ["the main process's value"]

    monkeypatch.setattr("hnmix.evaluate.monitor.broadcast_object_list", broadcast_object_list)
    assert broadcast_from_main("this process's value", TwoProcesses()) == "the main process's value"
    assert calls == [(["this process's value"], 0)]


def test_projection_features_are_the_query_encoders_normalised_head_output(monkeypatch):
    """--knn_features: the monitor scores, for "projection", exactly what the query encoder's head
    gives (L2-normalised, dim wide, MoCo's CIFAR-10 demo's monitor), for "backbone" the pooled
    features before it; both computed here directly, image by image."""
    encoder = MoCoEncoder("test_resnet", 16, head="linear")
    accelerator = Accelerator(cpu=True)
    scored = []

    def spy(bank, bank_labels, queries, query_labels, **options):
        scored.append((bank, queries))
        return knn_accuracy(bank, bank_labels, queries, query_labels, **options)

    monkeypatch.setattr("hnmix.evaluate.monitor.knn_accuracy", spy)
    for features in KNN_FEATURES:
        monitor = KnnMonitor.from_splits(splits_of(split(QUERIES)), accelerator, img_size=16, batch_size=3,
                                         num_workers=0, features=features)
        monitor.evaluate(monitor.network_of(encoder), accelerator)
    (backbone_bank, backbone_queries), (projection_bank, projection_queries) = scored

    images = EvalImages(split(BANK), image_column="image", label_column="label", img_size=16)
    encoder.eval()
    with torch.no_grad():
        pooled = torch.cat([encoder.backbone(images[i][0][None]) for i in range(len(BANK))])
        projected = torch.nn.functional.normalize(encoder.head(pooled), dim=1)
    assert projection_bank.shape == (len(BANK), 16) and projection_queries.shape == (len(QUERIES), 16)
    torch.testing.assert_close(projection_bank, projected)
    torch.testing.assert_close(projection_bank.norm(dim=1), torch.ones(len(BANK)))
    assert backbone_bank.shape == (len(BANK), encoder.backbone.num_features) != projection_bank.shape
    torch.testing.assert_close(backbone_bank, pooled)


def test_the_monitor_crops_and_normalises_its_images_as_told():
    """The training's normalisation reaches the monitor's images, and crop_pct 1 leaves an image of
    img_size as it is: the image is ToTensor + Normalize of the PNG's pixels, nothing else."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    monitor = KnnMonitor.from_splits(splits_of(split([({"bytes": buffer.getvalue(), "path": None}, 2)])),
                                     Accelerator(cpu=True), img_size=8, batch_size=3, num_workers=0, mean=mean, std=std,
                                     crop_pct=1.0)
    image, label = monitor.query_loader.dataset[0]
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(mean)[:, None, None]) / \
        torch.tensor(std)[:, None, None]
    torch.testing.assert_close(image, expected)
    assert label == 2


def test_an_unknown_kind_of_features_is_refused():
    with pytest.raises(ValueError, match="backbone, projection"):
        KnnMonitor(None, None, num_classes=3, features="logits")
