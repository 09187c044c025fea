"""Features of a frozen backbone over evaluation images (`EvalImages`, `make_eval_loader`,
`extract_features`), gathered across processes so that every sample counts once, in dataset order.

An image that cannot be read is skipped and counted, never the end of an evaluation (or of the
training that runs one): `EvalImages` returns it as a blank image labelled `UNREADABLE`, and
`extract_features` drops those rows and says how many it dropped. Any other failure on one rank
is made known to every rank before the next collective (`raise_if_any_rank_failed`), so that no
rank waits for it in a gather until the process group's timeout.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data
from accelerate import Accelerator
from accelerate.utils import gather_object
from torchvision import transforms

from hnmix import errors
from hnmix.data.images import to_rgb
from hnmix.data.augmentation import IMAGENET_MEAN, IMAGENET_STD
from hnmix.data.photometric import normalize
from hnmix.data.transforms import EVAL_CROP_PCT, eval_transform
from hnmix.data.two_views import DECODE_ERRORS, TwoViewDataset, warn_a_few
from hnmix.data.workers import ignore_stop_signals
from hnmix.errors import DataError, HnmixError, describe, first_line

UNREADABLE = -1  # the label of an image that could not be read

Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std), three floats each


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> float32 (images / 255 - mean) / std on their device: torchvision's
    ToTensor + Normalize, batched (the same numbers), so that workers hand over a quarter of the bytes."""
    return normalize(images.float().div_(255), tuple(mean), tuple(std))


class ExtractedFeatures(tuple):
    """(features [N, D] float32, labels [N] int64) of the readable images, in dataset order, with
    `skipped`: how many images of the split could not be read (left out)."""

    skipped: int

    def __new__(cls, features: torch.Tensor, labels: torch.Tensor, skipped: int) -> "ExtractedFeatures":
        extracted = super().__new__(cls, (features, labels))
        extracted.skipped = skipped
        return extracted


class RankFailedError(RuntimeError):
    """What every rank raises when a multi-process evaluation failed on some rank with an error that
    is no HnmixError (chained to the original on that rank). An HnmixError keeps its own type."""


def raise_if_any_rank_failed(failure: Optional[Exception], accelerator: Accelerator, what: str) -> None:
    """Raise on every rank when `failure` (this rank's exception, or None) is set on any rank; every
    rank calls it at the same point. One process: `failure` itself. Several: an all-reduce of a flag,
    then (only on a failure) every rank raises "WHAT failed on rank R of N: ..." for the first failing
    rank, as its HnmixError type, else `RankFailedError`.
    """
    if accelerator.num_processes == 1:
        if failure is not None:
            raise failure
        return
    flag = torch.tensor([float(failure is not None)], device=accelerator.device)
    if not accelerator.reduce(flag, reduction="sum").item():
        return
    mine = None
    if failure is not None:
        user_error = isinstance(failure, HnmixError)
        line = str(failure).strip().splitlines()[-1] if user_error else describe(failure)
        mine = (accelerator.process_index, type(failure).__name__ if user_error else None, line)
    rank, user_type, line = next(f for f in gather_object([mine]) if f is not None)
    message = f"{what} failed on rank {rank} of {accelerator.num_processes}: {line}"
    error_type = getattr(errors, user_type, HnmixError) if user_type else RankFailedError
    if not (isinstance(error_type, type) and issubclass(error_type, Exception)):
        error_type = HnmixError
    raise error_type(message) from failure


@contextmanager
def main_process_buffers(module: nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """Within the block every rank holds the main process's buffers (BatchNorm running statistics),
    which the checkpoints and the export carry (DDP runs without buffer broadcasts); its own afterwards."""
    buffers = [b for b in module.buffers() if b.numel()]
    if accelerator.num_processes == 1 or not buffers or not dist.is_initialized():
        yield
        return
    own = [b.detach().clone() for b in buffers]
    for buffer in buffers:
        dist.broadcast(buffer.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, own):
                buffer.copy_(saved)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator, *,
    normalization: Optional[Normalization] = None,
) -> ExtractedFeatures:
    """Run `backbone` over `loader` -> (features [N, D] float32, labels [N] int64) on every rank, on
    `accelerator.device`, without the images that could not be read (their number: `.skipped`).

    `loader` yields (images [B, 3, H, W], labels [B]) and is prepared by `accelerator`;
    `gather_for_metrics` drops the samples Accelerate repeats, so each sample counts once. With
    `normalization` the images are uint8 (`EvalImages(as_uint8=True)`), normalised here. The
    backbone runs in eval mode under `accelerator.autocast()` with `main_process_buffers`. After
    each batch the ranks agree that none failed (`raise_if_any_rank_failed`) before gathering it.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    batches, finished = iter(loader), False
    try:
        with main_process_buffers(backbone, accelerator):
            while True:
                failure, batch = None, None
                try:
                    batch = _features_of_next_batch(backbone, batches, accelerator, normalization)
                except Exception as error:  # noqa: BLE001 - made known to every rank, then raised
                    failure = error
                raise_if_any_rank_failed(failure, accelerator, "feature extraction")
                if batch is None:
                    finished = True
                    break
                batch_features, batch_labels = accelerator.gather_for_metrics(batch)
                features.append(batch_features)
                labels.append(batch_labels)
    finally:
        backbone.train(was_training)
        if not finished:  # the workers go, and an Accelerate loader ends: else the trainer's would not be active
            for stop in (getattr(batches, "close", None), getattr(loader, "end", None)):
                if stop is not None:
                    stop()
    if not features:
        raise DataError("the evaluation loader yielded no batches; pass a split that holds images")
    features, labels = torch.cat(features), torch.cat(labels)
    readable = labels != UNREADABLE
    skipped = int((~readable).sum())
    if skipped == labels.numel():
        raise DataError(f"none of the {skipped} evaluation images could be read; check the split's image files")
    return ExtractedFeatures(features[readable], labels[readable], skipped)


def _features_of_next_batch(backbone: nn.Module, batches: Iterator, accelerator: Accelerator,
                            normalization: Optional[Normalization]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(features [B, D] float32, labels [B] int64) of this rank's next batch, or None at the end (no collective)."""
    batch = next(batches, None)
    if batch is None:
        return None
    images, batch_labels = batch
    images = images.to(accelerator.device, non_blocking=True)
    if normalization is not None:
        images = normalize_uint8(images, *normalization)
    with accelerator.autocast():
        batch_features = backbone(images)
    return batch_features.float().flatten(1), batch_labels.to(accelerator.device).long()


class EvalImages(TwoViewDataset):
    """Row i of a labelled `datasets.Dataset` -> (image [3, S, S] float32, label int): read like a
    training sample, made RGB, cropped by `eval_transform(img_size, crop_pct=crop_pct)` and normalised
    with the encoder's `mean` and `std`. as_uint8: resized and cropped only, uint8 [3, S, S]; pass
    `self.normalization` to `extract_features`, which normalises each batch (the same numbers).
    """

    def __init__(self, dataset: datasets.Dataset, *, image_column: str, label_column: str, img_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 crop_pct: float = EVAL_CROP_PCT, as_uint8: bool = False):
        super().__init__(dataset, image_column=image_column, label_column=label_column, img_size=img_size, seed=0)
        self.transform = eval_transform(img_size, mean=mean, std=std, crop_pct=crop_pct)
        self.as_uint8 = as_uint8
        self.normalization: Normalization = (tuple(mean), tuple(std))
        if as_uint8:
            # eval_transform's resize and centre crop, without its ToTensor and Normalize.
            self.transform = transforms.Compose(self.transform.transforms[:-2] + [_uint8_tensor])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image [3, S, S], label); a blank image labelled UNREADABLE when it cannot be read."""
        index = int(index)
        row = self._read_row(index)
        try:
            image = self._open(row[self.image_column], index)
            try:
                return self.transform(to_rgb(image)), int(row[self.label_column])
            finally:
                image.close()
        except (DataError, *DECODE_ERRORS) as error:
            reported = error if isinstance(error, DataError) else self._unreadable(index, error)
            warn_a_few(self.warned, f"{first_line(reported)}; skipped in the evaluation", counted_in="eval_bad_samples")
            blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8 if self.as_uint8 else torch.float32)
            return blank, UNREADABLE


def _uint8_tensor(image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def make_eval_loader(images: EvalImages, *, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches (images [B, 3, S, S], labels [B] int64) in dataset order, to prepare with `accelerator.prepare`.

    Its own generator: without one, each pass would draw the workers' base seed from the global
    RNG and change the training's later draws. Workers ignore the run's stop signals (`hnmix.data.workers`).
    """
    return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(0),
                                       worker_init_fn=ignore_stop_signals)
