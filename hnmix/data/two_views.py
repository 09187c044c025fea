"""Row i of a dataset as two augmented views seeded by (seed, epoch, i), its index and its label,
fed to a DataLoader. Logging goes through `logging`: DataLoader workers have no Accelerate state.
"""

from __future__ import annotations

import logging
import random
from typing import Iterator, Optional

import datasets
import torch
import torch.utils.data
from PIL import Image

from hnmix.data.augmentation import MOCO_V2, AugmentationSpec
from hnmix.data.decoded import decode_in_memory
from hnmix.data.geometric import two_crops, two_crops_of_pixels
from hnmix.data.images import DECODE_ERRORS, encoded_bytes, open_image
from hnmix.data.sources import resolve_columns
from hnmix.data.transforms import ImageTransform
from hnmix.data.workers import fit_prefetch, ignore_stop_signals
from hnmix.errors import DataError, describe, first_line

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of sample `index` in `epoch` of a run seeded with `seed` (a string seed:
    Python hashes it with SHA-512, so neighbouring samples get unrelated streams)."""
    return random.Random(f"{seed}:{epoch}:{index}")


MAX_REPLACEMENTS = 10  # unreadable images in a row that mean the dataset itself is broken
WARNINGS_PER_DATASET = 5  # unreadable images named in warnings, over all the workers; the rest are counted


def warn_a_few(warned: torch.Tensor, message: str, *, counted_in: str) -> None:
    """Log `message` if it is one of the dataset's first WARNINGS_PER_DATASET. `warned` is the
    dataset's count, in shared memory so that every worker process adds to the same one (two
    workers at the same instant may both pass the limit: it stays bounded)."""
    count = int(warned.add_(1).item())
    if count <= WARNINGS_PER_DATASET:
        more = f"; further ones are only counted ({counted_in})" if count == WARNINGS_PER_DATASET else ""
        logger.warning(f"{message}{more}")


class TwoViewDataset(torch.utils.data.Dataset):
    """`__getitem__(epoch * len(self) + index)` (as `EpochSampler` yields) -> (view_q [3, S, S],
    view_k [3, S, S], index: int, label: int, unreadable: int), S = img_size, label -1 without one.

    The views are uint8, cropped and flipped only (`two_crops`), when `photometric` is None (the
    photometric half then runs batched on the accelerator); else `photometric(view)` of each
    (`moco_v2_photometric`: float32, normalised). The image is decoded once for both views, or
    once for the run when all the images fit in `in_memory_bytes` decoded (`hnmix.data.decoded`).
    An unreadable image is replaced by another drawn from (seed, epoch, index), so batches keep
    their size; `unreadable` counts the replacements.

    Why the views are seeded per sample: every draw comes from `sample_rng(seed, epoch, index)`
    (the per-image photometric transforms from torch's CPU generator seeded from it, inside
    `fork_rng`), so a sample gets the same views whichever worker or process loads it, a resumed
    run reproduces them, and the caller's RNG state is left as it was (only
    `torch.default_generator` is reseeded: `torch.manual_seed` would reseed every CUDA generator).
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
        augmentation: AugmentationSpec = MOCO_V2,
        in_memory_bytes: int = 0,
    ):
        resolve_columns(dataset, image_column, label_column if label_column is not None else "none")
        kept = [image_column] + ([label_column] if label_column is not None and label_column != image_column else [])
        # Undecoded cells, opened lazily, so that a JPEG can be decoded at a reduced size.
        self.dataset = dataset.select_columns(kept).cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.label_column = label_column
        self.img_size = img_size
        self.photometric = photometric
        self.augmentation = augmentation
        self.seed = seed
        # Shared before the DataLoader forks or spawns its workers, so that they all count in it.
        self.warned = torch.zeros((), dtype=torch.int64).share_memory_()
        self.decoded = decode_in_memory(self.dataset, image_column, img_size=img_size, budget_bytes=in_memory_bytes)
        self.labels = self._all_labels() if self.decoded is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def batch_bytes(self, batch_size: int) -> int:
        """Bytes of one collated batch: two views [B, 3, S, S] (uint8, or float32), three [B] int64."""
        view_bytes = 3 * self.img_size**2 * (1 if self.photometric is None else 4)
        return batch_size * (2 * view_bytes + 3 * 8)

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
                views, label = self._two_views_and_label(index, sample_rng(self.seed, epoch, index))
                break
            except (DataError, *DECODE_ERRORS) as error:
                unreadable += 1
                replacement = sample_rng(self.seed + unreadable, epoch, index).randrange(len(self))
                if unreadable > MAX_REPLACEMENTS:
                    raise DataError(f"{MAX_REPLACEMENTS} images in a row could not be read, the last one "
                                    f"image {index} ({first_line(error)}); check the dataset's files") from None
                what = (first_line(error) if isinstance(error, DataError)
                        else f"image {index} cannot be read ({describe(error)})")
                warn_a_few(self.warned, f"{what}; using image {replacement} instead",
                           counted_in="bad_samples in metrics.jsonl")
                index = replacement
        return *views, index, label, unreadable

    def _two_views_and_label(self, index: int, rng: random.Random) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        if self.decoded is not None:
            try:
                pixels = self.decoded.pixels_of(index)
            except DECODE_ERRORS as error:
                raise self._unreadable(index, error) from None
            views = two_crops_of_pixels(pixels, self.img_size, rng, augmentation=self.augmentation)
            return self._photometric(views, rng), -1 if self.labels is None else int(self.labels[index])
        row = self._read_row(index)
        views = self._crops_of_cell(row[self.image_column], index, rng)
        label = -1
        if self.label_column is not None and row[self.label_column] is not None:
            label = int(row[self.label_column])
        return self._photometric(views, rng), label

    def _crops_of_cell(self, cell: Optional[dict], index: int, rng: random.Random, cut=two_crops):
        """`cut(image, img_size, rng, encoded, augmentation=...)` (`two_crops`, or `one_crop`) of the
        undecoded image `cell` of row `index`; an unreadable image raises a DataError naming it."""
        encoded = encoded_bytes(cell) if cell is not None else None
        image = self._open(cell, index, encoded)
        try:
            return cut(image, self.img_size, rng, encoded, augmentation=self.augmentation)
        except DECODE_ERRORS as error:
            raise self._unreadable(index, error) from None
        finally:
            image.close()

    def _photometric(self, views: list[torch.Tensor], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _all_labels(self) -> Optional[torch.Tensor]:
        """[N] int64, -1 where a row has no label; None without a label column."""
        if self.label_column is None:
            return None
        labels = self.dataset.select_columns([self.label_column])[self.label_column]
        return torch.tensor([-1 if label is None else int(label) for label in labels], dtype=torch.int64)

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
    """A shuffled pass over `num_samples` items that encodes the epoch in each index: yields
    `epoch * num_samples + i` for i in a permutation seeded with `seed + epoch`, the same on every
    process, from which `TwoViewDataset` recovers (epoch, i). Accelerate's prepared DataLoader
    calls `set_epoch` before each pass."""

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
    dataset: TwoViewDataset, *, batch_size: int, num_workers: int, seed: int, prefetch_factor: Optional[int] = None
) -> torch.utils.data.DataLoader:
    """The training DataLoader: EpochSampler order, full batches only, its own seeded generator
    (an iterator does not consume the global RNG), workers that ignore the run's stop signals,
    `prefetch_factor` batches ready per worker (default: as many as fit in /dev/shm, `fit_prefetch`).
    """
    if len(dataset) < batch_size:
        raise DataError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size} (incomplete "
            f"batches are dropped); lower --batch_size to at most {len(dataset)} or use more images"
        )
    if num_workers > 0 and prefetch_factor is None:
        prefetch_factor = fit_prefetch(dataset.batch_bytes(batch_size), num_workers).prefetch_factor
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed),
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,
    )
