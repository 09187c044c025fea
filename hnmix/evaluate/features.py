"""Features of a frozen backbone over evaluation images.

- `EvalImages`, `make_eval_loader`: a split as deterministic, evaluation-transformed images.
- `extract_features`: a backbone run over a DataLoader prepared by Accelerate, gathered across
  processes so that every sample counts once, in dataset order.

An image that cannot be read is skipped and counted, never the end of an evaluation (or of the
training that runs one): `EvalImages` returns it as a blank image labelled `UNREADABLE`, and
`extract_features` drops those rows and says how many it dropped.

The first few are named in warnings, counted across DataLoader workers (`hnmix.data.two_views.warn_a_few`).

Any other failure on one rank (a dataset that raises, a worker that dies, memory) is made known
to every rank before the next collective (`raise_if_any_rank_failed`), so that no rank waits for
it in a gather until the process group's timeout: every rank raises the same error, naming the
rank that failed, and the trainer's kNN monitor can log it and train on.
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
    """uint8 images [B, 3, H, W] -> float32 [B, 3, H, W], (images / 255 - mean) / std per channel, on
    the images' device: torchvision's ToTensor + Normalize of each image, batched (the same float32
    operations, so the same numbers). DataLoader workers then hand over uint8 crops, a quarter of
    the bytes, and the accelerator does the float work."""
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
    """What every rank raises when a part of a multi-process evaluation failed on some rank with
    an error that is no HnmixError (a programming error, memory, a dead worker). On the rank
    where it happened it is chained to the original (`raise ... from`), whose traceback shows.
    An HnmixError (a user's) is raised again as its own type instead, still one line."""


def raise_if_any_rank_failed(failure: Optional[Exception], accelerator: Accelerator, what: str) -> None:
    """Raise on every rank when `failure` (this rank's exception, or None) is set on any rank;
    every rank must call it at the same point, before the collective the failure would block.

    One process: `failure` itself is raised. Several: an all-reduce of a failure flag, then (only
    when some rank failed) the failures' descriptions are gathered, and every rank raises the same
    error for the first failing rank: its HnmixError type again, else `RankFailedError`, with
    the line "WHAT failed on rank R of N: ...".
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
    """Within the block every rank holds the main process's buffers (BatchNorm running statistics);
    afterwards each rank has its own back.

    The trainer runs DDP without buffer broadcasts, so ranks drift apart; checkpoints and the
    exported encoder carry the main process's, and so does an evaluation.
    """
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
    """Run `backbone` over `loader` -> (features [N, D] float32, labels [N] int64) on every rank,
    without the images that could not be read (their number: `.skipped`).

    `loader` yields (images [B, 3, H, W], labels [B]) and must be prepared by `accelerator`
    (`accelerator.prepare(loader)`): each process then sees a shard, and
    `accelerator.gather_for_metrics` puts the shards back together in dataset order, dropping the
    samples Accelerate repeats to even out the last batch, so each of the N samples counts once.
    With `normalization` (mean, std) the images are uint8 (`EvalImages(as_uint8=True)`) and are
    normalised on `accelerator.device` (`normalize_uint8`); without it they come normalised. The backbone runs in eval mode, without gradients, under `accelerator.autocast()`, with the
    main process's buffers (`main_process_buffers`); its training mode and buffers are restored
    afterwards. Results stay on `accelerator.device`.

    Each rank reads and runs its batch alone, then the ranks agree that none failed
    (`raise_if_any_rank_failed`: one all-reduce per batch) before gathering it; a failure on any
    rank is raised on every rank and the pass is abandoned (`_abandon`).
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
        if not finished:
            _abandon(loader, batches)
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
    """(features [B, D] float32, labels [B] int64) of this rank's next batch, or None at the end.
    No collective: a failure here is this rank's alone until `raise_if_any_rank_failed`."""
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


def _abandon(loader: torch.utils.data.DataLoader, batches: Iterator) -> None:
    """Stop a pass that did not reach its end: close the iterator (its workers go) and take an
    Accelerate loader off the GradientState's active loaders, as its end would have (else the
    trainer's own loader would no longer be the active one)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    end = getattr(loader, "end", None)
    if end is not None:
        end()


class EvalImages(TwoViewDataset):
    """Row i of a labelled `datasets.Dataset` -> (image [3, S, S] float32, label int).

    The image is read and checked like a training sample (`TwoViewDataset`'s reading, with its
    one-line error for an undecodable image), made RGB by `hnmix.data.images.to_rgb`, cropped by the
    deterministic `hnmix.data.transforms.eval_transform(img_size, crop_pct=crop_pct)` (1: no crop
    of an image of img_size) and normalised with `mean` and `std` (the encoder's training
    normalisation: `AugmentationSpec.mean`, `.std`).

    as_uint8: the image is resized and cropped only, uint8 [3, S, S]; pass `self.normalization`
    to `extract_features`, which normalises each batch on the accelerator (the same numbers).
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
    """Batches (images [B, 3, S, S] float32, uint8 from `EvalImages(as_uint8=True)`; labels [B] int64)
    in dataset order, the last one possibly smaller. Prepare it with `accelerator.prepare` before `extract_features`.

    The loader has a generator of its own: a DataLoader without one draws its workers' base seed
    from the global RNG on every pass, and an evaluation in the middle of training would then
    change the training's later random draws. Workers ignore the run's stop signals, so that a
    SIGTERM during the trainer's kNN evaluation stops the run cleanly (`hnmix.data.workers`).
    """
    return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(0),
                                       worker_init_fn=ignore_stop_signals)
