"""hnmix.data.sources: every kind of --dataset, its splits and columns, and one-line errors.
"""

from __future__ import annotations

import datasets
import pytest
from data_images import (
    hub_like_features,
    raises_one_line,
    write_caltech_like_repo,
    write_image_folder,
)

from hnmix.data.sources import load_image_dataset, resolve_columns
from hnmix.data.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPLIT_ROWS = {"train": 7, "validation": 3, "test": 2}


def test_hub_repo_layout_with_parquet_shards_loads_every_split(tmp_path, cache_dir):
    """A local copy of ilee0022/Caltech-256 (data/<split>-00000-of-00001.parquet) goes through
    the same load_dataset call as the Hub id and keeps the Image feature."""
    root = write_caltech_like_repo(tmp_path / "caltech", SPLIT_ROWS)
    for split, rows in SPLIT_ROWS.items():
        dataset = load_image_dataset(str(root), split=split, cache_dir=cache_dir)
        assert len(dataset) == rows
        assert dataset.column_names == ["image", "label", "text"]
        assert isinstance(dataset.features["image"], datasets.Image)
        assert dataset[0]["image"].size == (20, 16)
        assert resolve_columns(dataset) == ("image", "label")


def test_image_folder_gives_a_class_label_per_subfolder(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "folder", {"cat": 3, "dog": 2, "emu": 4})
    dataset = load_image_dataset(str(root), cache_dir=cache_dir)
    assert len(dataset) == 9
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset.features["label"].names == ["cat", "dog", "emu"]
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert resolve_columns(dataset) == ("image", "label")


def test_save_to_disk_dataset_dict_loads_its_split(tmp_path):
    saved = datasets.DatasetDict(
        train=make_synthetic_dataset(12, seed=0, image_size=16),
        validation=make_synthetic_dataset(5, seed=1, image_size=16),
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert len(load_image_dataset(str(tmp_path / "saved"))) == 12
    assert len(load_image_dataset(str(tmp_path / "saved"), split="validation")) == 5
    message = raises_one_line(load_image_dataset, str(tmp_path / "saved"), split="test")
    assert "'test'" in message and "train, validation" in message


def test_a_dataset_saved_without_splits_is_the_train_split_only(tmp_path):
    make_synthetic_dataset(6, seed=0, image_size=16).save_to_disk(str(tmp_path / "single"))
    assert len(load_image_dataset(str(tmp_path / "single"))) == 6
    message = raises_one_line(load_image_dataset, str(tmp_path / "single"), split="validation")
    assert "'train' only" in message


def test_home_relative_path_is_expanded(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_image_folder(tmp_path / "pics", {"a": 2, "b": 2})
    assert len(load_image_dataset("~/pics", cache_dir=cache_dir)) == 4


def test_missing_local_path_is_a_data_error(tmp_path):
    for source in (str(tmp_path / "nowhere"), "./not-here", "~/not-here-either", "a/b/c"):
        message = raises_one_line(load_image_dataset, source)
        assert "does not exist" in message and source in message


def test_a_file_is_not_a_dataset_directory(tmp_path):
    (tmp_path / "file.parquet").write_bytes(b"")
    assert "not a directory" in raises_one_line(load_image_dataset, str(tmp_path / "file.parquet"))


def test_unknown_split_lists_the_available_ones(tmp_path, cache_dir):
    root = write_caltech_like_repo(tmp_path / "caltech", SPLIT_ROWS)
    message = raises_one_line(load_image_dataset, str(root), split="valid", cache_dir=cache_dir)
    assert "'valid'" in message and "train, validation, test" in message
    message = raises_one_line(load_image_dataset, "synthetic", split="dev")
    assert "'dev'" in message and "train, validation, test" in message


def test_directory_without_data_files_is_a_data_error(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    message = raises_one_line(load_image_dataset, str(tmp_path / "empty"), cache_dir=cache_dir)
    assert "parquet" in message


def test_empty_dataset_is_a_data_error(tmp_path):
    empty = datasets.Dataset.from_dict({"image": [], "label": [], "text": []}, features=hub_like_features())
    datasets.DatasetDict(train=empty).save_to_disk(str(tmp_path / "empty"))
    assert "no rows" in raises_one_line(load_image_dataset, str(tmp_path / "empty"))


def test_unreachable_hub_id_says_how_to_go_on(cache_dir):
    """HF_HUB_OFFLINE=1 (the autouse fixture) stands for any network failure."""
    message = raises_one_line(load_image_dataset, "nobody-here/no-such-dataset", cache_dir=cache_dir)
    assert "nobody-here/no-such-dataset" in message
    assert "ConnectionError" in message
    assert "--dataset synthetic" in message and "--dataset PATH" in message
    message = raises_one_line(load_image_dataset, "cifar10", cache_dir=cache_dir)
    assert "--dataset synthetic" in message


def test_missing_image_column_names_the_option():
    dataset = datasets.Dataset.from_dict({"picture": ["x"], "label": [0]})
    message = raises_one_line(resolve_columns, dataset)
    assert "--image_column" in message and "picture" in message
    message = raises_one_line(resolve_columns, dataset, "label")
    assert "--image_column" in message and "not images" in message


def test_label_column_choice():
    dataset = make_synthetic_dataset(4, seed=0, image_size=8)
    assert resolve_columns(dataset) == ("image", "label")
    assert resolve_columns(dataset, label_column="none") == ("image", None)
    assert resolve_columns(dataset.rename_column("label", "category")) == ("image", "category")
    assert resolve_columns(dataset.remove_columns("label")) == ("image", None)
    with_text = dataset.add_column("text", ["a", "b", "c", "d"])
    message = raises_one_line(resolve_columns, with_text, label_column="text")
    assert "--label_column" in message
    message = raises_one_line(resolve_columns, dataset, label_column="fine_label")
    assert "--label_column" in message and "fine_label" in message
