"""load_eval_splits(held_out_split=...): a named split is the queries, the whole train split the
bank (MoCo's CIFAR-10 demo: 50,000 train images against the 10,000 test images), on a copy laid
out like the Hub's uoft-cs/cifar10; a split that is missing, unlabelled or the train split itself
is one line."""

import datasets
import pytest
from data_images import CIFAR10_CLASSES, raises_one_line, write_cifar10_like_repo

from hnmix.evaluate.splits import load_eval_splits

CIFAR = dict(image_column="img", label_column="label")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return str(write_cifar10_like_repo(tmp_path_factory.mktemp("cifar10"), {"train": 30, "test": 12}))


def test_a_named_split_is_the_queries_and_the_whole_train_split_the_bank(cifar):
    splits = load_eval_splits(cifar, **CIFAR, held_out_split="test")
    assert (len(splits.train), len(splits.held_out)) == (30, 12)
    assert splits.held_out_name == "test" and splits.held_out_source == f"{cifar} split test"
    assert "held-out" not in splits.train_source
    assert splits.held_out["label"] == [i % 10 for i in range(12)]
    assert splits.num_classes == len(CIFAR10_CLASSES)


def test_without_a_named_split_a_part_of_train_is_held_out_as_before(cifar):
    splits = load_eval_splits(cifar, **CIFAR, eval_split_size=10)
    assert (len(splits.train), len(splits.held_out)) == (20, 10)
    assert splits.held_out_name == "train (held-out part)"


def test_the_named_split_is_bounded_like_the_others(cifar):
    splits = load_eval_splits(cifar, **CIFAR, held_out_split="test", max_samples=8)
    assert (len(splits.train), len(splits.held_out)) == (8, 8)


def test_a_missing_split_is_one_line_that_lists_the_splits(cifar):
    message = raises_one_line(load_eval_splits, cifar, **CIFAR, held_out_split="validation")
    assert message == f"split 'validation' does not exist in dataset {cifar}; available splits: train, test"


def test_the_train_split_itself_is_refused(cifar):
    message = raises_one_line(load_eval_splits, cifar, **CIFAR, held_out_split="train")
    assert "every query would find itself" in message


def test_an_unlabelled_split_is_refused(tmp_path):
    """A Hub test split without labels (-1 throughout) cannot be the kNN's queries."""
    root = write_cifar10_like_repo(tmp_path / "cifar10", {"train": 20, "test": 4})
    test_file = root / "plain_text" / "test-00000-of-00001.parquet"
    test = datasets.Dataset.from_parquet(str(test_file))
    test.map(lambda row: {"label": -1}).to_parquet(str(test_file))
    message = raises_one_line(load_eval_splits, str(root), **CIFAR, held_out_split="test")
    assert message.startswith(f"split 'test' of dataset {root} has no labels in column 'label'")
