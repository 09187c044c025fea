"""The labelled splits a frozen encoder is evaluated on.

`load_eval_splits`: the kNN bank / linear-probe train split, the held-out split (a split named by
the caller, else the dataset's `validation` split, else a fixed stratified part of the train
split), `test`, and for the fast linear probe a selection split (where it picks lr and weight
decay) that is never the reported one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import datasets
import numpy as np

from hnmix.data.sources import load_image_dataset, resolve_columns
from hnmix.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_SEED = 69420  # hnmix.train.config's default: the same synthetic images and held-out split as training

NO_LABELS = ("kNN/linear evaluation needs a label column; pass --label_column, or --eval_every 0 to train "
             "without the kNN monitor")


@dataclass
class EvalSplits:
    """Labelled splits to evaluate on (see `load_eval_splits`), each already bounded by `max_samples`.

    The *_source fields say where each came from, for reports; held_out_name names the held-out
    split in a word or two for metrics records ("validation", "test", "train (held-out part)").
    """

    train: datasets.Dataset
    held_out: datasets.Dataset
    test: Optional[datasets.Dataset]
    image_column: str
    label_column: str
    num_classes: int
    train_source: str
    held_out_source: str
    test_source: Optional[str]
    selection: Optional[datasets.Dataset] = None
    selection_source: Optional[str] = None
    held_out_name: str = "held_out"

    @property
    def reported(self) -> datasets.Dataset:
        """The split a protocol with a test role reports on: `test`, else `held_out`."""
        return self.test if self.test is not None else self.held_out

    @property
    def reported_source(self) -> str:
        if self.test is not None:
            return str(self.test_source)
        return f"{self.held_out_source} (no test split: the held-out split is reported)"

    def _role(self, role: str) -> tuple[Optional[datasets.Dataset], Optional[str]]:
        if role == "test":
            return self.reported, self.reported_source
        return getattr(self, role), getattr(self, f"{role}_source")

    def sizes(self, roles: Sequence[str] = ("train", "held_out")) -> dict[str, int]:
        """Images per role; roles among train, held_out, selection and test (= `reported`)."""
        return {role: len(self._role(role)[0]) for role in roles if self._role(role)[0] is not None}

    def describe(self, roles: Sequence[str] = ("train", "held_out")) -> dict[str, Any]:
        """Where each role's split came from, its size, the columns and the class count (JSON-ready)."""
        sources = {role: self._role(role)[1] for role in roles if self._role(role)[0] is not None}
        return sources | {"sizes": self.sizes(roles), "image_column": self.image_column,
                          "label_column": self.label_column, "num_classes": self.num_classes}


_MISSING_SPLIT = re.compile(r"^split '[^']*' does not exist|has no rows;")


def _optional_split(source: str, split: str, label_column: str, **load: Any) -> Optional[datasets.Dataset]:
    """`load_image_dataset(source, split=split)`, or None when that split is missing, empty or
    unlabelled (`_labelled`; Hub test splits often carry -1). Any other DataError is raised."""
    try:
        dataset = load_image_dataset(source, split=split, **load)
    except DataError as error:
        if _MISSING_SPLIT.search(str(error)):
            logger.info("dataset %s has no usable %s split", source, split)
            return None
        raise
    if not _labelled(dataset, label_column):
        logger.info("dataset %s: split %s has no %r column, or all its labels are missing or negative; not used",
                    source, split, label_column)
        return None
    return dataset


def _named_split(source: str, split: str, label_column: str, **load: Any) -> datasets.Dataset:
    """`load_image_dataset(source, split=split)` (a missing split: its one-line DataError), which must hold labels."""
    dataset = load_image_dataset(source, split=split, **load)
    if not _labelled(dataset, label_column):
        raise DataError(f"split {split!r} of dataset {source} has no labels in column {label_column!r} (missing, or "
                        "all missing or negative); a kNN needs labelled queries: choose a labelled split")
    return dataset


def _labelled(dataset: datasets.Dataset, column: str) -> bool:
    """Whether `dataset` has the column `column` and a label >= 0 in it."""
    if column not in dataset.column_names:
        return False
    values = dataset.select_columns([column]).with_format("arrow")[:][column]
    return values.null_count < len(values) and any(v is not None and v >= 0 for v in values.to_pylist())


def _labels(dataset: datasets.Dataset, column: str, name: str) -> np.ndarray:
    """The label column as [N] int64; a missing or negative label is a DataError."""
    values = dataset.select_columns([column]).with_format("arrow")[:][column]
    if values.null_count:
        raise DataError(f"{values.null_count} rows of the {name} split have no {column!r} label; "
                        "pass a dataset whose evaluation splits are fully labelled, or turn evaluation off")
    labels = np.asarray(values, dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"the {name} split has negative labels in column {column!r}; "
                        "pass --label_column NAME of a column of class ids 0..C-1")
    return labels


def _check_split_size(eval_split_size: Union[int, float]) -> None:
    if isinstance(eval_split_size, bool) or not (
        (isinstance(eval_split_size, int) and eval_split_size >= 1)
        or (isinstance(eval_split_size, float) and 0.0 < eval_split_size < 1.0)
    ):
        raise ConfigError(f"eval_split_size must be a fraction in (0, 1) or a count >= 1, got {eval_split_size!r}; "
                          "pass e.g. --eval_split_size 0.1")


def stratified_holdout(
    dataset: datasets.Dataset, label_column: str, size: Union[int, float], *, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, held_out): a fixed, seeded, stratified part of `dataset` (`size`: fraction or count).

    `datasets.Dataset.train_test_split(stratify_by_column=...)` runs on an in-memory table of the
    labels alone (a ClassLabel of the same ids), then `select` applies it: the same split as on the
    full dataset, without rewriting its images or needing a ClassLabel column.
    """
    labels = _labels(dataset, label_column, "train")
    table = datasets.Dataset.from_dict(
        {"label": labels, "row": np.arange(len(labels))},
        features=datasets.Features({"label": datasets.ClassLabel(num_classes=int(labels.max()) + 1),
                                    "row": datasets.Value("int64")}),
    )
    try:
        parts = table.train_test_split(test_size=size, stratify_by_column="label", seed=seed, keep_in_memory=True)
    except ValueError as error:
        raise DataError(f"cannot hold out a stratified eval split of size {size} from {len(labels)} rows "
                        f"({str(error).splitlines()[0]}); pass another --eval_split_size, or a dataset "
                        "with a validation split") from None
    rest, held_out = (sorted(parts[name]["row"]) for name in ("train", "test"))
    return (dataset.select(rest, keep_in_memory=True), dataset.select(held_out, keep_in_memory=True))


def bounded_subset(dataset: datasets.Dataset, max_samples: Optional[int], *, seed: int, salt: int = 0) -> datasets.Dataset:
    """At most `max_samples` rows: a seeded uniform draw without replacement, kept in dataset order."""
    if max_samples is None or len(dataset) <= max_samples:
        return dataset
    rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(salt,)))
    return dataset.select(np.sort(rng.choice(len(dataset), max_samples, replace=False)), keep_in_memory=True)


def load_eval_splits(
    source: str,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: Optional[str] = None,
    eval_split_size: Union[int, float] = 0.1,
    max_samples: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    cache_dir: Optional[str] = None,
    synthetic_size: int = 512,
    with_test: bool = False,
    with_selection: bool = False,
    held_out_split: Optional[str] = None,
) -> EvalSplits:
    """The labelled splits of `--dataset` (any form `hnmix.data.sources.load_image_dataset` takes).

    - train: split `split`, the kNN bank and the linear classifiers' training split.
    - held_out: the split `held_out_split` when given, with the whole of train (MoCo's CIFAR-10
      demo: bank = train, queries = test); else the dataset's `validation` split, else
      `stratified_holdout(train)`, which train then loses.
    - test (with_test or with_selection): the `test` split when it exists, else None.
    - selection (with_selection): where the fast linear probe picks lr and weight decay, never the
      reported split: held_out when there is a test split, else a second stratified part of train.
    A validation or test split without labels counts as missing. Each is then cut to `max_samples`
    rows (`bounded_subset`). num_classes is the ClassLabel's count, else the largest label + 1.
    """
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"eval_max_samples must be >= 1, got {max_samples}; pass a positive count or leave it out")
    _check_split_size(eval_split_size)
    load = dict(cache_dir=cache_dir, seed=seed, synthetic_size=synthetic_size)
    train = load_image_dataset(source, split=split, **load)
    image_column, label_column = resolve_columns(train, image_column, label_column)
    if label_column is None:
        raise DataError(NO_LABELS)
    train_source = f"{source} split {split}"
    if held_out_split == split:
        raise DataError(f"the held-out split {held_out_split!r} is the train split, the kNN bank: every query would "
                        "find itself; choose another split (e.g. test), or none to hold out a part of the train split")
    validation = None
    if held_out_split is None and split != "validation":
        validation = _optional_split(source, "validation", label_column, **load)
    if held_out_split is not None:
        held_out = _named_split(source, held_out_split, label_column, **load)
        held_out_source, held_out_name = f"{source} split {held_out_split}", held_out_split
    elif validation is not None:
        held_out, held_out_source, held_out_name = validation, f"{source} split validation", "validation"
    else:
        train, held_out = stratified_holdout(train, label_column, eval_split_size, seed=seed)
        held_out_source = f"{source} split {split}: stratified held-out part of size {eval_split_size}, seed {seed}"
        held_out_name = f"{split} (held-out part)"
        train_source += " without its held-out part"
    test, test_source = None, None
    if (with_test or with_selection) and split != "test":
        test = _optional_split(source, "test", label_column, **load)
        test_source = f"{source} split test" if test is not None else None
    selection, selection_source, carved = None, None, False
    if with_selection and test is not None:
        selection, selection_source = held_out, held_out_source
    elif with_selection:
        train, selection = stratified_holdout(train, label_column, eval_split_size, seed=seed)
        selection_source = (f"{source} split {split}: a second stratified part of size {eval_split_size} of "
                            f"what the held-out part left, seed {seed}")
        train_source += " and its selection part"
        carved = True

    feature = train.features[label_column]
    named = {"train": train, "held_out": held_out} | ({"test": test} if test is not None else {})
    for dataset in named.values():
        resolve_columns(dataset, image_column, label_column)
    labels = {name: _labels(dataset, label_column, name) for name, dataset in named.items()}
    if isinstance(feature, datasets.ClassLabel):
        num_classes = feature.num_classes
        for name, values in labels.items():
            if values.max() >= num_classes:
                raise DataError(f"the {name} split has label {values.max()} but column {label_column!r} of the train "
                                f"split has classes 0..{num_classes - 1}; pass a dataset whose splits share their classes")
    else:
        num_classes = max(int(values.max()) for values in labels.values()) + 1
    train, held_out = (bounded_subset(d, max_samples, seed=seed, salt=i) for i, d in enumerate((train, held_out)))
    test = bounded_subset(test, max_samples, seed=seed, salt=2) if test is not None else None
    if selection is not None:
        selection = bounded_subset(selection, max_samples, seed=seed, salt=3) if carved else held_out
    splits = EvalSplits(train, held_out, test, image_column, label_column, num_classes,
                        train_source, held_out_source, test_source, selection, selection_source, held_out_name)
    roles = ("train", "held_out") + (("selection",) if with_selection else ()) + \
        (("test",) if with_test or with_selection else ())
    logger.info("evaluation splits: %s (%d classes)", splits.sizes(roles), num_classes)
    return splits
