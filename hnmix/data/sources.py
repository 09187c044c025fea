"""`--dataset` as a `datasets.Dataset`: a Hub id, a local folder laid out like one, an image folder,
a `save_to_disk` directory, or `synthetic`; and which of its columns hold the image and the label.
Logging goes through `logging`: data is loaded on every process, and in workers, without Accelerate.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import datasets
import pyarrow
from datasets.exceptions import DatasetGenerationError, DatasetsError

from hnmix.data.synthetic import (
    _SYNTHETIC_SPLITS,
    SYNTHETIC_SOURCES,
    _synthetic_split_seed,
    make_hard_synthetic_dataset,
    make_synthetic_dataset,
)
from hnmix.errors import DataError, describe, first_line, network_error_types

logger = logging.getLogger(__name__)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_WAY_OUT = "pass --dataset PATH (a local copy) or --dataset synthetic"
_DESCRIBED: set[tuple] = set()  # the datasets this process has described in a log line


def load_image_dataset(
    source: str,
    *,
    split: str = "train",
    cache_dir: Optional[str] = None,
    seed: int = 0,
    synthetic_size: int = 512,
) -> datasets.Dataset:
    """Load `--dataset` as one split of a `datasets.Dataset`, or raise a one-line DataError.

    source: "synthetic" / "synthetic-hard" (`synthetic_size` images; validation and test get seeds
    derived from `seed`; a folder of that name is ./synthetic); a `save_to_disk` directory (a
    Dataset saved alone is split "train" only); any other directory or a Hub id, through
    `datasets.load_dataset(source, split=..., cache_dir=...)`.
    """
    if source in SYNTHETIC_SOURCES:
        if split not in _SYNTHETIC_SPLITS:
            raise DataError(
                f"split {split!r} does not exist in the {source} dataset; "
                f"available splits: {', '.join(_SYNTHETIC_SPLITS)}"
            )
        make = make_synthetic_dataset if source == "synthetic" else make_hard_synthetic_dataset
        dataset = make(synthetic_size, seed=_synthetic_split_seed(seed, split))
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                dataset = _load_saved_to_disk(path, split)
            else:
                dataset = _load_with_datasets(str(path), split, cache_dir, from_hub=False)
        elif path.exists():
            raise DataError(
                f"dataset path {source} is a file, not a directory; pass the folder that holds it "
                "(parquet shards under data/, one subfolder per class, or a save_to_disk folder)"
            )
        elif _HUB_ID.fullmatch(source):
            dataset = _load_with_datasets(source, split, cache_dir, from_hub=True)
        else:
            raise DataError(
                f"dataset path {source} does not exist; pass an existing directory, a Hub id "
                "(owner/name), or --dataset synthetic"
            )
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"dataset {source} split {split!r} is not a map-style datasets.Dataset; pass a single split")
    if len(dataset) == 0:
        raise DataError(f"dataset {source} split {split!r} has no rows; pass a dataset or split that holds images")
    described = (source, split, len(dataset), tuple(dataset.column_names))
    if described not in _DESCRIBED:  # a run loads the train split twice: for training and for the kNN monitor
        _DESCRIBED.add(described)
        logger.info("dataset %s split %s: %d rows, columns %s", source, split, len(dataset), dataset.column_names)
    return dataset


def _load_saved_to_disk(path: Path, split: str) -> datasets.Dataset:
    """One split of a `save_to_disk` folder, loaded alone; an empty one is reported before
    `load_from_disk` sees it: datasets 5.2 writes 0 shards for it, then fails to read them."""
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits") or []
        if split not in splits:
            raise DataError(
                f"split {split!r} does not exist in {path}; available splits: {', '.join(splits) or 'none'}"
            )
        folder = path / split
    elif split != "train":
        raise DataError(
            f"split {split!r} does not exist in {path}: it holds one Dataset saved without splits, "
            "usable as split 'train' only"
        )
    else:
        folder = path
    if _read_json(folder / "state.json").get("_data_files") == []:
        raise DataError(f"dataset {path} split {split!r} has no rows; pass a dataset or split that holds images")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, DatasetsError, ValueError) as error:
        raise DataError(
            f"cannot read the save_to_disk folder {folder} ({describe(error)}); save it again with save_to_disk"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{folder} does not hold a single split; pass the folder written by save_to_disk")
    return loaded


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read {path} ({describe(error)}); save the dataset again with save_to_disk"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a save_to_disk metadata file; save the dataset again with save_to_disk")
    return content


def _load_with_datasets(source: str, split: str, cache_dir: Optional[str], *, from_hub: bool) -> datasets.Dataset:
    """`datasets.load_dataset(source, split=...)` with its user-caused failures as one-line DataErrors."""
    if from_hub:
        logger.info("loading dataset %s (split %s) from the Hugging Face Hub or its cache", source, split)
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ValueError as error:
        available = _available_splits(error)
        if available is None:  # e.g. a Hub dataset with several configs and none chosen
            raise DataError(f"datasets cannot load {source} ({describe(error)}); {_WAY_OUT}") from None
        raise DataError(
            f"split {split!r} does not exist in dataset {source}; available splits: {', '.join(available)}"
        ) from None
    except DatasetGenerationError as error:
        raise DataError(
            f"datasets could not read the files of {source} ({describe(error)}); check or re-download them"
        ) from None
    except (*network_error_types(), DatasetsError) as error:
        if not from_hub:
            raise DataError(
                f"datasets could not load the directory {source} ({describe(error)}); it must hold parquet "
                "shards under data/, one subfolder of images per class, or be a save_to_disk folder"
            ) from None
        raise DataError(
            f"could not load dataset {source!r} from the Hugging Face Hub ({describe(error)}); "
            f"no local directory of that name exists either; {_WAY_OUT}"
        ) from None


def _available_splits(error: ValueError) -> Optional[list[str]]:
    """The split names in datasets' 'Unknown split "x". Should be one of [...]' error, else None."""
    if "Unknown split" not in str(error):
        return None
    match = re.search(r"one of \[(.*?)\]", str(error))
    return re.findall(r"'([^']*)'", match.group(1)) if match else [first_line(error)]


def resolve_columns(
    dataset: datasets.Dataset, image_column: str = "image", label_column: Optional[str] = None
) -> tuple[str, Optional[str]]:
    """The (image column, label column or None) to read from `dataset`.

    image_column must hold images. label_column None means auto: "label" if it holds integer
    class ids, else the first ClassLabel column, else none; "none" means no labels; a named one
    must hold integers (ClassLabel or an integer Value).
    """
    columns = dataset.column_names
    if image_column not in columns:
        raise DataError(
            f"image column {image_column!r} is not in the dataset (columns: {', '.join(columns)}); "
            "pass --image_column NAME"
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise DataError(
            f"column {image_column!r} holds {_feature_name(dataset.features[image_column])}, not images; "
            "pass --image_column NAME of an image column"
        )
    if label_column is None:
        if "label" in columns and _is_integer_label(dataset.features["label"]):
            return image_column, "label"
        for name in columns:
            if isinstance(dataset.features[name], datasets.ClassLabel):
                return image_column, name
        return image_column, None
    if label_column.lower() == "none":
        return image_column, None
    if label_column not in columns:
        raise DataError(
            f"label column {label_column!r} is not in the dataset (columns: {', '.join(columns)}); "
            "pass --label_column NAME, or --label_column none to train without labels"
        )
    if not _is_integer_label(dataset.features[label_column]):
        raise DataError(
            f"label column {label_column!r} holds {_feature_name(dataset.features[label_column])}, not integer "
            "class ids; pass --label_column NAME of a ClassLabel or integer column, or --label_column none"
        )
    return image_column, label_column


def _is_integer_label(feature: object) -> bool:
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and pyarrow.types.is_integer(feature.pa_type))


def _feature_name(feature: object) -> str:
    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    return type(feature).__name__
