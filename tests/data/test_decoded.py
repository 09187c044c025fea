"""hnmix.data.decoded: small images decoded once and kept in shared memory give the same samples
as decoding them at every draw; images too large or too many are decoded at every draw.
"""

from __future__ import annotations

import logging

import pytest
import torch
from data_images import write_cifar10_like_repo, write_folder_with_corrupt_files

from hnmix.data.augmentation import MOCO_CIFAR10_DEMO
from hnmix.data.decoded import GIB
from hnmix.data.sources import load_image_dataset
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import TwoViewDataset, make_train_loader
from hnmix.errors import ConfigError
from hnmix.train.config import RESUMABLE_CHANGES, parse_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cifar_like(tmp_path, cache_dir):
    return load_image_dataset(str(write_cifar10_like_repo(tmp_path / "cifar", {"train": 24})), cache_dir=cache_dir)


def two_views(dataset, *, in_memory_bytes: int, img_size: int = 32, photometric: bool = False,
              image_column: str = "img", label_column: str | None = "label") -> TwoViewDataset:
    return TwoViewDataset(dataset, image_column=image_column, label_column=label_column, img_size=img_size, seed=3,
                          photometric=moco_v2_photometric(img_size, MOCO_CIFAR10_DEMO) if photometric else None,
                          augmentation=MOCO_CIFAR10_DEMO, in_memory_bytes=in_memory_bytes)


def assert_same_samples(first: TwoViewDataset, second: TwoViewDataset, encoded_indices) -> None:
    for encoded_index in encoded_indices:
        a, b = first[encoded_index], second[encoded_index]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), encoded_index
        assert a[2:] == b[2:], encoded_index


@pytest.mark.parametrize("photometric", [False, True], ids=["uint8 views", "photometric in the worker"])
def test_cifar_sized_images_kept_in_memory_give_the_samples_of_decoding_at_every_draw(cifar_like, photometric):
    kept = two_views(cifar_like, in_memory_bytes=GIB, photometric=photometric)
    per_draw = two_views(cifar_like, in_memory_bytes=0, photometric=photometric)
    assert kept.decoded is not None and per_draw.decoded is None
    assert kept.decoded.nbytes == 24 * 32 * 32 * 3 and kept.decoded.buffer.is_shared()
    assert_same_samples(kept, per_draw, range(2 * len(cifar_like)))  # two epochs
    assert {kept[i][3] for i in range(len(kept))} == set(range(10))


def test_without_a_label_column_the_kept_images_have_label_minus_one(cifar_like):
    kept = two_views(cifar_like, in_memory_bytes=GIB, label_column=None)
    assert kept.decoded is not None and kept[5][3] == -1


def test_over_the_budget_or_too_large_the_images_are_decoded_at_every_draw(cifar_like, caplog):
    with caplog.at_level(logging.INFO, logger="hnmix.data.decoded"):
        assert two_views(cifar_like, in_memory_bytes=24 * 32 * 32 * 3 - 1).decoded is None
        assert "over the budget of" in caplog.text and "--images_in_memory_gib" in caplog.text
        caplog.clear()
        # 32 px images for 16 px views: a crop of 32 could come from a half-size decode.
        assert two_views(cifar_like, in_memory_bytes=GIB, img_size=16).decoded is None
        assert "32 px on its short side, at least twice img_size 16" in caplog.text
        caplog.clear()
        assert two_views(cifar_like, in_memory_bytes=GIB, img_size=17).decoded is not None
        assert "Decoded the 24 images once, kept in memory" in caplog.text


def test_unreadable_images_are_replaced_counted_and_named_as_when_decoded_at_every_draw(tmp_path, cache_dir, caplog):
    dataset = load_image_dataset(str(write_folder_with_corrupt_files(tmp_path / "folder", good=6, corrupt=2)),
                                 cache_dir=cache_dir)
    warnings = {}
    for budget in (GIB, 0):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hnmix.data.two_views"):
            views = two_views(dataset, in_memory_bytes=budget, img_size=24, image_column="image")
            samples = [views[i] for i in range(len(dataset))]
        assert (views.decoded is not None) == (budget > 0)
        warnings[budget] = [record.getMessage() for record in caplog.records]
        if budget:
            kept_samples = samples
    assert sum(sample[4] for sample in samples) == 2
    assert warnings[GIB] == warnings[0] and len(warnings[0]) == 2 and "cannot be decoded" in warnings[0][0]
    for a, b in zip(kept_samples, samples):
        assert torch.equal(a[0], b[0]) and a[2:] == b[2:]


def test_forked_workers_read_the_kept_images_and_load_the_batches_of_decoding_at_every_draw(cifar_like):
    kept = make_train_loader(two_views(cifar_like, in_memory_bytes=GIB), batch_size=8, num_workers=2, seed=1)
    per_draw = make_train_loader(two_views(cifar_like, in_memory_bytes=0), batch_size=8, num_workers=0, seed=1)
    for a, b in zip(kept, per_draw, strict=True):
        for tensor_a, tensor_b in zip(a, b, strict=True):
            assert torch.equal(tensor_a, tensor_b)


def test_the_budget_option_is_a_size_in_gib_that_may_change_on_resume():
    assert parse_config(["--images_in_memory_gib", "0"]).data.images_in_memory_gib == 0
    with pytest.raises(ConfigError, match="option images_in_memory_gib must be >= 0, got -1.0"):
        parse_config(["--images_in_memory_gib", "-1"])
    assert "images_in_memory_gib" in RESUMABLE_CHANGES  # the views are the same either way
