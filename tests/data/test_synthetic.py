"""hnmix.data.synthetic: the generated labelled image set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_images import pixels
from PIL import Image

from hnmix.data.sources import load_image_dataset
from hnmix.data.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_synthetic_is_deterministic_given_the_seed():
    a = make_synthetic_dataset(40, seed=3, image_size=32)
    b = make_synthetic_dataset(40, seed=3, image_size=32)
    assert a["label"] == b["label"]
    for i in (0, 17, 39):
        assert np.array_equal(pixels(a[i]["image"]), pixels(b[i]["image"]))


def test_synthetic_differs_between_seeds_and_between_splits():
    a = make_synthetic_dataset(40, seed=3)
    b = make_synthetic_dataset(40, seed=4)
    assert not np.array_equal(pixels(a[0]["image"]), pixels(b[0]["image"]))
    train = load_image_dataset("synthetic", split="train", seed=3, synthetic_size=40)
    validation = load_image_dataset("synthetic", split="validation", seed=3, synthetic_size=40)
    test = load_image_dataset("synthetic", split="test", seed=3, synthetic_size=40)
    assert np.array_equal(pixels(train[5]["image"]), pixels(a[5]["image"]))
    assert not np.array_equal(pixels(train[5]["image"]), pixels(validation[5]["image"]))
    assert not np.array_equal(pixels(validation[5]["image"]), pixels(test[5]["image"]))


def test_synthetic_has_the_requested_size_classes_and_features():
    dataset = load_image_dataset("synthetic", synthetic_size=37, seed=0)
    assert len(dataset) == 37
    assert dataset.features["label"].names == [f"class_{c}" for c in range(10)]
    assert set(dataset["label"]) == set(range(10))
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    small = make_synthetic_dataset(9, seed=0, num_classes=3, image_size=24)
    assert sorted(small["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert small[0]["image"].size == (24, 24)


def test_synthetic_classes_are_separable_well_above_chance():
    """Nearest class mean of a 4 x 4 thumbnail, fitted on train, scored on validation."""
    train = load_image_dataset("synthetic", split="train", synthetic_size=200, seed=0)
    validation = load_image_dataset("synthetic", split="validation", synthetic_size=100, seed=0)

    def thumbnails(dataset):
        return np.stack([pixels(row["image"].resize((4, 4), Image.BOX)).ravel() for row in dataset]).astype(float)

    train_x, train_y = thumbnails(train), np.array(train["label"])
    means = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    validation_x, validation_y = thumbnails(validation), np.array(validation["label"])
    predicted = ((validation_x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == validation_y).mean() > 0.6  # chance is 0.1


def test_synthetic_hard_is_deterministic_balanced_and_shares_its_classes_across_splits():
    from hnmix.data.sources import load_image_dataset
    from hnmix.data.synthetic import _class_glyphs

    first = load_image_dataset("synthetic-hard", seed=3, synthetic_size=96)
    again = load_image_dataset("synthetic-hard", seed=3, synthetic_size=96)
    validation = load_image_dataset("synthetic-hard", split="validation", seed=3, synthetic_size=96)
    assert first["image"][0] == again["image"][0]
    assert pixels(first[0]["image"]).tolist() != pixels(validation[0]["image"]).tolist()
    assert first.features["label"].num_classes == validation.features["label"].num_classes == 16
    assert np.bincount(first["label"]).tolist() == [6] * 16
    glyphs = _class_glyphs(16)
    flat = {g.tobytes() for g in glyphs} | {g[:, ::-1].copy().tobytes() for g in glyphs}
    assert len(flat) == 32  # distinct, and no class is the mirror image of another (views are flipped)


def test_an_untrained_network_is_near_chance_on_synthetic_hard():
    import timm

    from hnmix.data.synthetic import make_hard_synthetic_dataset
    from hnmix.evaluate.probes import knn_accuracy

    bank, queries = make_hard_synthetic_dataset(512, seed=1), make_hard_synthetic_dataset(256, seed=2)
    torch.manual_seed(0)
    network = timm.create_model("resnet18", num_classes=0).eval()

    def features(dataset):
        images = torch.stack([torch.from_numpy(pixels(image).astype(np.float32) / 255).permute(2, 0, 1)
                              for image in dataset["image"]])
        with torch.no_grad():
            return network((images - 0.45) / 0.225)

    result = knn_accuracy(features(bank), torch.tensor(bank["label"]), features(queries),
                          torch.tensor(queries["label"]), num_classes=16, k=50, temperature=0.1)
    assert result["knn_top1"] < 15  # chance is 6.25%; the easy `synthetic` gives an untrained network ~86%
