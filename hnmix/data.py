"""Images from `datasets`, as RGB, with their index and label, as two views in a DataLoader.

`load_image_dataset` turns `--dataset` (a Hub id, a local folder, or "synthetic") into a
`datasets.Dataset`; `resolve_columns` picks its image and label columns; `TwoViewDataset` reads
row i as an RGB image and draws two augmented views seeded by (seed, epoch, i); `EpochSampler`
and `make_train_loader` feed it to a DataLoader. This module knows nothing about MoCo.

Logging goes through the standard `logging` module: data is loaded on every process and in
DataLoader workers, where no Accelerate state exists.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import random
import re
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
import torch
import torch.utils.data
from datasets.exceptions import DatasetGenerationError, DatasetsError
from PIL import Image

from hnmix.augment import ImageTransform
from hnmix.geometric import two_crops
from hnmix.images import encoded_bytes, open_image
from hnmix.errors import DataError, describe, first_line, network_error_types

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_WAY_OUT = "pass --dataset PATH (a local copy) or --dataset synthetic"
_SYNTHETIC_SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- synthetic data


def make_synthetic_dataset(
    size: int, *, seed: int, num_classes: int = 10, image_size: int = 64
) -> datasets.Dataset:
    """A procedurally generated labelled image set, deterministic given `seed`.

    Class c is a sinusoidal stripe pattern with its own orientation (c * 180/num_classes deg),
    stripe frequency and pair of colours (hues spread around the colour wheel). Each image
    jitters the angle, frequency, phase, colours and brightness and adds pixel noise, so the
    classes are easy to tell apart (a kNN monitor rises well above chance) but images differ.
    Labels are balanced (size // num_classes each, the remainder spread) and shuffled.

    Columns: `image` (datasets.Image, RGB PNG, image_size x image_size), `label`
    (datasets.ClassLabel, names "class_0" ...). 512 images of 64 px take well under a second.
    """
    if size < 1:
        raise DataError(f"synthetic dataset size must be at least 1, got {size}; pass --synthetic_size N with N >= 1")
    if num_classes < 1 or image_size < 1:
        raise DataError(
            f"synthetic dataset needs num_classes >= 1 and image_size >= 1, got {num_classes} and {image_size}"
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64))
    labels = rng.permutation(np.arange(size) % num_classes)

    classes = np.arange(num_classes)
    class_angle = classes * np.pi / num_classes
    class_cycles = 3.0 + 2.0 * (classes % 3)  # stripes per image side
    class_hue = classes / num_classes

    angle = class_angle[labels] + rng.uniform(-0.08, 0.08, size)  # about +-5 degrees
    cycles = class_cycles[labels] * rng.uniform(0.85, 1.15, size)
    phase = rng.uniform(0.0, 2.0 * np.pi, size)
    hue = (class_hue[labels] + rng.uniform(-0.03, 0.03, size)) % 1.0
    brightness = rng.uniform(0.75, 1.0, size)

    def per_image(values: np.ndarray) -> np.ndarray:  # [N] -> [N, 1, 1] float32
        return values.astype(np.float32)[:, None, None]

    axis = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")  # [H, W]
    wave = 2 * np.pi * (per_image(cycles * np.cos(angle)) * x + per_image(cycles * np.sin(angle)) * y)
    stripes = 0.5 + 0.5 * np.sin(wave + per_image(phase))  # [N, H, W] in [0, 1]

    foreground = 255.0 * _hue_to_rgb(hue) * brightness[:, None]  # [N, 3]
    background = 255.0 * 0.25 * _hue_to_rgb((hue + 0.5) % 1.0)  # [N, 3], dark complementary colour
    pixels = np.empty((size, image_size, image_size, 3), np.uint8)
    for channel in range(3):
        start = per_image(background[:, channel])
        span = per_image(foreground[:, channel] - background[:, channel])
        noise = rng.standard_normal((size, image_size, image_size), dtype=np.float32) * 8.0
        pixels[..., channel] = np.clip(start + stripes * span + noise + 0.5, 0, 255)  # + 0.5: round

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(num_classes)]),
        }
    )
    images = [{"bytes": _png_bytes(array), "path": None} for array in pixels]
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes, uncompressed (fast; noisy pixels barely compress anyway)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def _hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """[N] hue in [0, 1) -> [N, 3] fully saturated RGB in [0, 1]."""
    channel_offsets = np.array([0.0, 2.0 / 3.0, 1.0 / 3.0])
    distance = np.abs(((hue[:, None] + channel_offsets) % 1.0) * 6.0 - 3.0)
    return np.clip(distance - 1.0, 0.0, 1.0)


def _synthetic_split_seed(seed: int, split: str) -> int:
    """train keeps `seed`; validation and test get their own well-mixed seeds, so splits differ."""
    if split == "train":
        return seed
    stream = np.random.SeedSequence(seed % 2**64, spawn_key=(_SYNTHETIC_SPLITS.index(split),))
    return int(stream.generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------- loading


def load_image_dataset(
    source: str,
    *,
    split: str = "train",
    cache_dir: Optional[str] = None,
    seed: int = 0,
    synthetic_size: int = 512,
) -> datasets.Dataset:
    """Load `--dataset` as one split of a `datasets.Dataset`.

    source:
    - "synthetic": `make_synthetic_dataset(synthetic_size, ...)` (a folder named "synthetic" is
      reached as ./synthetic). Split "train" uses `seed`; "validation" and "test" use seeds
      derived from it, so the three splits differ; other splits are a DataError.
    - an existing directory written by `save_to_disk` (has dataset_dict.json or state.json):
      `datasets.load_from_disk`, then the split. A Dataset saved alone has no splits and is
      accepted as split "train" only.
    - any other existing directory: `datasets.load_dataset(source, split=...)`, the same call as
      for a Hub id. It reads a copy of a Hub dataset repo (parquet shards under data/, e.g.
      data/train-00000-of-00001.parquet) or an image folder with one subfolder per class
      (label becomes a ClassLabel named after the folders).
    - a Hub id ("name" or "owner/name"): `datasets.load_dataset`, through `cache_dir`. Without
      network this fails (HF_HUB_OFFLINE=1: at once; no DNS: ~25 s of huggingface_hub retries)
      unless the dataset is already in the cache.

    Raises DataError (one line, with the way out) for a missing path, an unreachable or unknown
    Hub dataset, an unknown split (listing the available ones) and an empty split.
    """
    if source == "synthetic":
        if split not in _SYNTHETIC_SPLITS:
            raise DataError(
                f"split {split!r} does not exist in the synthetic dataset; "
                f"available splits: {', '.join(_SYNTHETIC_SPLITS)}"
            )
        dataset = make_synthetic_dataset(synthetic_size, seed=_synthetic_split_seed(seed, split))
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
    logger.info("dataset %s split %s: %d rows, columns %s", source, split, len(dataset), dataset.column_names)
    return dataset


def _load_saved_to_disk(path: Path, split: str) -> datasets.Dataset:
    """One split of a `save_to_disk` folder. The split's own folder is loaded (not the whole
    DatasetDict), and a split saved with no rows is reported before `load_from_disk` sees it:
    datasets 5.2 writes 0 shards for an empty Dataset and then fails to read them (IndexError)."""
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
    message = str(error)
    if "Unknown split" not in message:
        return None
    match = re.search(r"one of (\[.*?\])", message)
    if match:
        try:
            return [str(name) for name in ast.literal_eval(match.group(1))]
        except (ValueError, SyntaxError):
            pass
    return [first_line(error)]


# ----------------------------------------------------------------------------- columns


def resolve_columns(
    dataset: datasets.Dataset, image_column: str = "image", label_column: Optional[str] = None
) -> tuple[str, Optional[str]]:
    """The (image column, label column or None) to read from `dataset`.

    image_column must exist and hold images (a datasets.Image feature).
    label_column None means auto: "label" if it holds integer class ids, else the first
    ClassLabel column, else no labels. "none" means no labels. An explicitly named label column
    must exist and hold integers (ClassLabel or an integer Value).
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
    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype in (
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    )


def _feature_name(feature: object) -> str:
    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    return type(feature).__name__


# ----------------------------------------------------------------------------- two views


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of sample `index` in `epoch` of a run seeded with `seed` (a string seed:
    Python hashes it with SHA-512, so neighbouring samples get unrelated streams)."""
    return random.Random(f"{seed}:{epoch}:{index}")


# How PIL and datasets fail on a file that is not a readable image (or one too large to be).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# An unreadable image is replaced by another, drawn from (seed, epoch, index); this many failures
# in a row mean the dataset itself is broken.
MAX_REPLACEMENTS = 10
_WARNINGS_PER_PROCESS = 5
_warned = 0


def _warn_unreadable(index: int, error: BaseException, replacement: int) -> None:
    """Name the first few unreadable images of this (worker) process in a warning."""
    global _warned
    _warned += 1
    if _warned <= _WARNINGS_PER_PROCESS:
        more = "; further ones are only counted (bad_samples in metrics.jsonl)" if _warned == _WARNINGS_PER_PROCESS else ""
        what = first_line(error) if isinstance(error, DataError) else f"image {index} cannot be read ({describe(error)})"
        logger.warning(f"{what}; using image {replacement} instead{more}")


class TwoViewDataset(torch.utils.data.Dataset):
    """Row i of a `datasets.Dataset` as two augmented views, its index and its label.

    `__getitem__(epoch * len(self) + index)` (the encoding `EpochSampler` yields) returns
    (view_q [3, S, S], view_k [3, S, S], index: int, label: int, unreadable: int), S = img_size,
    label -1 when there is no label column (or the row's label is missing). The views are
    - uint8, cropped and flipped only, when `photometric` is None: the photometric half then
      runs batched on the accelerator (`hnmix.photometric`);
    - `photometric(view)` of each cropped view otherwise (`hnmix.augment.moco_v2_photometric`:
      float32, normalised): the whole MoCo v2 augmentation in the worker.
    The image is decoded once for both views, at a reduced size when the crops allow
    (`hnmix.geometric.two_crops`). An image that cannot be read (truncated, empty, not an image,
    a decompression bomb) is replaced by another drawn from (seed, epoch, index), so batches keep
    their size; `unreadable` counts the replacements.

    Why the views are seeded per sample: every draw comes from `sample_rng(seed, epoch, index)`
    (the per-image photometric transforms from torch's CPU generator seeded from it, inside
    `torch.random.fork_rng`). So the same sample in the same epoch gets the same two views
    whichever DataLoader worker, process or number of workers loads it, a resumed run reproduces
    them exactly, and the caller's RNG state is left as it was. Only the CPU generator is
    reseeded (`torch.default_generator`, not `torch.manual_seed`, which would also reseed every
    CUDA generator of the caller).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        *,
        image_column: str,
        label_column: Optional[str],
        img_size: int,
        seed: int,
        photometric: Optional[ImageTransform] = None,
    ):
        resolve_columns(dataset, image_column, label_column if label_column is not None else "none")
        kept = [image_column] + ([label_column] if label_column is not None and label_column != image_column else [])
        # Undecoded cells: the image is opened lazily, so that a JPEG can be decoded at a reduced size.
        self.dataset = dataset.select_columns(kept).cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.label_column = label_column
        self.img_size = img_size
        self.photometric = photometric
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, encoded_index: int) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """(view_q, view_k, index, label, unreadable): `unreadable` counts the images that could
        not be read and were replaced (index and label are then the replacement's)."""
        encoded_index = int(encoded_index)
        if encoded_index < 0:
            raise IndexError(f"encoded index must be >= 0, got {encoded_index}")
        epoch, index = divmod(encoded_index, len(self))
        unreadable = 0
        while True:
            try:
                row = self._read_row(index)
                views = self._two_views(row[self.image_column], index, sample_rng(self.seed, epoch, index))
                break
            except (DataError, *DECODE_ERRORS) as error:
                unreadable += 1
                replacement = sample_rng(self.seed + unreadable, epoch, index).randrange(len(self))
                if unreadable > MAX_REPLACEMENTS:
                    raise DataError(f"{MAX_REPLACEMENTS} images in a row could not be read, the last one "
                                    f"image {index} ({first_line(error)}); check the dataset's files") from None
                _warn_unreadable(index, error, replacement)
                index = replacement
        label = -1
        if self.label_column is not None and row[self.label_column] is not None:
            label = int(row[self.label_column])
        return *views, index, label, unreadable

    def _two_views(self, cell: Optional[dict], index: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = encoded_bytes(cell) if cell is not None else None
        image = self._open(cell, index, encoded)
        try:
            views = two_crops(image, self.img_size, rng, encoded)
        except DECODE_ERRORS as error:
            raise self._unreadable(index, error) from None
        finally:
            image.close()
        if self.photometric is None:
            return views[0], views[1]
        # torchvision's transforms draw from torch's global CPU generator: seed it from the
        # sample's stream, and leave the caller's state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng.getrandbits(63))
            return tuple(self.photometric(Image.fromarray(view.permute(1, 2, 0).numpy())) for view in views)

    def _open(self, cell: Optional[dict], index: int, encoded: Optional[bytes] = None) -> Image.Image:
        """The undecoded image of row `index` (header read), or a DataError naming it."""
        if cell is None:
            raise DataError(f"image {index} of the dataset is missing (an empty cell); remove the row")
        try:
            return open_image(cell, encoded)
        except DECODE_ERRORS as error:
            raise self._unreadable(index, error) from None

    def _read_row(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except DECODE_ERRORS as error:
            raise self._unreadable(index, error) from None

    def _unreadable(self, index: int, error: BaseException) -> DataError:
        return DataError(f"image {index} of the dataset{self._where(index)} cannot be decoded "
                         f"({describe(error)}); remove or replace it")

    def _where(self, index: int) -> str:
        """' (path)' of row `index`'s image file when the dataset stored one, else ''."""
        try:
            cell = self.dataset.with_format("arrow")[index][self.image_column][0].as_py()
            path = cell.get("path") if isinstance(cell, dict) else None
        except Exception:  # only decorates an error message
            path = None
        return f" ({path})" if path else ""


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffled pass over `num_samples` items that encodes the epoch in each index.

    Yields `epoch * num_samples + i` for i in `torch.randperm(num_samples)` drawn from a generator
    seeded with `seed + epoch`: the same order on every process, and `TwoViewDataset` can recover
    (epoch, i) to seed the views. Call `set_epoch` before each pass (Accelerate's prepared
    DataLoader does it with its own pass counter).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter((order + self.epoch * self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_train_loader(
    dataset: TwoViewDataset, *, batch_size: int, num_workers: int, seed: int
) -> torch.utils.data.DataLoader:
    """The training DataLoader: EpochSampler order, full batches only (drop_last).

    Batches: (view_q [B, 3, H, W] float32, view_k [B, 3, H, W] float32, index [B] int64,
    label [B] int64). The loader has its own seeded generator, so making an iterator does not
    consume the global RNG. An exception in a worker is re-raised by the DataLoader in the main
    process with the same type; its message then holds the worker's traceback (the original
    one-line message is its last line).
    """
    if len(dataset) < batch_size:
        raise DataError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size} (incomplete "
            f"batches are dropped); lower --batch_size to at most {len(dataset)} or use more images"
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed),
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
