"""Features of a frozen backbone over evaluation images.

- `EvalImages`, `make_eval_loader`: a split as deterministic, evaluation-transformed images.
- `extract_features`: a backbone run over a DataLoader prepared by Accelerate, gathered across
  processes so that every sample counts once, in dataset order.

An image that cannot be read is skipped and counted, never the end of an evaluation (or of the
training that runs one): `EvalImages` returns it as a blank image labelled `UNREADABLE`, and
`extract_features` drops those rows and says how many it dropped.

The first few are named in warnings, counted across DataLoader workers (`hnmix.data.two_views.warn_a_few`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import datasets
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data
from accelerate import Accelerator

from hnmix.data.images import to_rgb
from hnmix.data.transforms import eval_transform
from hnmix.data.two_views import DECODE_ERRORS, TwoViewDataset, warn_a_few
from hnmix.data.workers import ignore_stop_signals
from hnmix.errors import DataError, first_line

UNREADABLE = -1  # the label of an image that could not be read


class ExtractedFeatures(tuple):
    """(features [N, D] float32, labels [N] int64) of the readable images, in dataset order, with
    `skipped`: how many images of the split could not be read (left out)."""

    skipped: int

    def __new__(cls, features: torch.Tensor, labels: torch.Tensor, skipped: int) -> "ExtractedFeatures":
        extracted = super().__new__(cls, (features, labels))
        extracted.skipped = skipped
        return extracted


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
    backbone: nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator
) -> ExtractedFeatures:
    """Run `backbone` over `loader` -> (features [N, D] float32, labels [N] int64) on every rank,
    without the images that could not be read (their number: `.skipped`).

    `loader` yields (images [B, 3, H, W], labels [B]) and must be prepared by `accelerator`
    (`accelerator.prepare(loader)`): each process then sees a shard, and
    `accelerator.gather_for_metrics` puts the shards back together in dataset order, dropping the
    samples Accelerate repeats to even out the last batch, so each of the N samples counts once.
    The backbone runs in eval mode, without gradients, under `accelerator.autocast()`, with the
    main process's buffers (`main_process_buffers`); its training mode and buffers are restored
    afterwards. Results stay on `accelerator.device`.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        with main_process_buffers(backbone, accelerator):
            for images, batch_labels in loader:
                with accelerator.autocast():
                    batch_features = backbone(images.to(accelerator.device))
                batch_features = batch_features.float().flatten(1)
                batch_labels = batch_labels.to(accelerator.device).long()
                batch_features, batch_labels = accelerator.gather_for_metrics((batch_features, batch_labels))
                features.append(batch_features)
                labels.append(batch_labels)
    finally:
        backbone.train(was_training)
    if not features:
        raise DataError("the evaluation loader yielded no batches; pass a split that holds images")
    features, labels = torch.cat(features), torch.cat(labels)
    readable = labels != UNREADABLE
    skipped = int((~readable).sum())
    if skipped == labels.numel():
        raise DataError(f"none of the {skipped} evaluation images could be read; check the split's image files")
    return ExtractedFeatures(features[readable], labels[readable], skipped)


class EvalImages(TwoViewDataset):
    """Row i of a labelled `datasets.Dataset` -> (image [3, S, S] float32, label int).

    The image is read and checked like a training sample (`TwoViewDataset`'s reading, with its
    one-line error for an undecodable image), made RGB by `hnmix.data.images.to_rgb` and cropped by the
    deterministic `hnmix.data.transforms.eval_transform(img_size)`.
    """

    def __init__(self, dataset: datasets.Dataset, *, image_column: str, label_column: str, img_size: int):
        super().__init__(dataset, image_column=image_column, label_column=label_column, img_size=img_size, seed=0)
        self.transform = eval_transform(img_size)

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
            return torch.zeros(3, self.img_size, self.img_size), UNREADABLE


def make_eval_loader(images: EvalImages, *, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches (images [B, 3, S, S] float32, labels [B] int64) in dataset order, the last one
    possibly smaller. Prepare it with `accelerator.prepare` before `extract_features`.

    The loader has a generator of its own: a DataLoader without one draws its workers' base seed
    from the global RNG on every pass, and an evaluation in the middle of training would then
    change the training's later random draws. Workers ignore the run's stop signals, so that a
    SIGTERM during the trainer's kNN evaluation stops the run cleanly (`hnmix.data.workers`).
    """
    return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(0),
                                       worker_init_fn=ignore_stop_signals)
