"""hnmix.data.synthetic: the generated labelled image set.
"""

from __future__ import annotations

import numpy as np
import pytest
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
