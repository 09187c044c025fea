"""A dataset's images decoded once and kept in memory, when they fit.

A CIFAR-10 image (32 x 32) takes about three times as long to read, open and decode as to cut
its two views. So when all the training images fit in a budget, `decode_in_memory` decodes each
once, as the per-image path decodes it, into one uint8 buffer in shared memory that forked or
spawned workers read without a copy. The budget is checked on a sample first, then while decoding.

Only images under twice img_size on their short side are kept: the per-image path decodes them
at full size too (never reduced, see `hnmix.data.geometric`), so the views cut from the kept
pixels are the same views, and keeping them or not is a matter of speed only.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import datasets
import numpy as np
import torch

from hnmix.data.geometric import upright_size
from hnmix.data.images import DECODE_ERRORS, decode_jpeg_upright, encoded_bytes, open_image, to_rgb
from hnmix.errors import DataError

logger = logging.getLogger(__name__)

GIB = 1024**3
SAMPLED_FOR_ESTIMATE = 64
_READ_BATCH = 1024  # cells read from the dataset at a time


class DecodedImages:
    """Every image of a dataset as upright uint8 pixels, in one shared buffer. `pixels_of(i)` ->
    uint8 [H_i, W_i, 3], a view of it, or the error decoding image i raised, as a decode raises it."""

    def __init__(self, buffer: torch.Tensor, shapes: torch.Tensor, offsets: torch.Tensor,
                 errors: dict[int, BaseException]):
        self.buffer = buffer.share_memory_()  # [sum of H_i * W_i * 3] uint8
        self.shapes = shapes.share_memory_()  # [N, 2] int64 (H_i, W_i); (0, 0) for an unreadable image
        self.offsets = offsets.share_memory_()  # [N] int64, the start of image i in the buffer
        self.errors = errors

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def pixels_of(self, index: int) -> torch.Tensor:
        if index in self.errors:
            raise self.errors[index].with_traceback(None)
        height, width = self.shapes[index].tolist()
        start = int(self.offsets[index])
        return self.buffer[start:start + height * width * 3].view(height, width, 3)


def decode_rgb(cell: Optional[dict], index: int) -> torch.Tensor:
    """A `datasets.Image(decode=False)` cell -> upright uint8 [H, W, 3], decoded at full size as
    `hnmix.data.geometric.two_crops` decodes it (libjpeg-turbo for JPEGs, PIL for the rest)."""
    if cell is None:
        raise DataError(f"image {index} of the dataset is missing (an empty cell); remove the row")
    encoded = encoded_bytes(cell)
    with open_image(cell, encoded) as image:
        pixels = decode_jpeg_upright(image, encoded) if encoded is not None else None
        if pixels is None:
            pixels = torch.from_numpy(np.array(to_rgb(image)))
    return pixels


def estimated_bytes(dataset: datasets.Dataset, image_column: str, *,
                    sample: int = SAMPLED_FOR_ESTIMATE) -> tuple[int, int]:
    """(bytes of all the images of `dataset` (undecoded cells) decoded, the largest short side),
    estimated from `sample` evenly spaced ones' headers."""
    indices = np.linspace(0, len(dataset) - 1, min(sample, len(dataset))).round().astype(int).tolist()
    sizes, short_side = [], 0
    for index in indices:
        cell = dataset[index][image_column]
        if cell is None:
            continue
        try:
            with open_image(cell) as image:
                width, height = upright_size(image)
            sizes.append(width * height * 3)
            short_side = max(short_side, min(width, height))
        except DECODE_ERRORS:  # an unreadable image in the sample: the decode proper reports it
            continue
    return (int(np.mean(sizes) * len(dataset)) if sizes else 0), short_side


def decode_in_memory(dataset: datasets.Dataset, image_column: str, *, img_size: int,
                     budget_bytes: int) -> Optional[DecodedImages]:
    """All images of `dataset` (its `image_column` cast to `datasets.Image(decode=False)`)
    decoded, or None when they would take more than `budget_bytes` or one has a short side of
    2 * img_size or more (checked on a sample first, then while decoding); the decision is
    logged with its numbers."""
    if budget_bytes <= 0 or len(dataset) == 0:
        return None
    budget = f"{budget_bytes / GIB:.2f} GiB (--images_in_memory_gib)"
    estimate, short_side = estimated_bytes(dataset, image_column)
    if estimate > budget_bytes:
        logger.info(f"Images decoded at every draw: all {len(dataset):,} would take about "
                    f"{estimate / GIB:.2f} GiB decoded, over the budget of {budget}")
        return None
    if short_side >= 2 * img_size:
        logger.info(_too_large(short_side, img_size))
        return None
    start = time.perf_counter()
    arrays, shapes, errors, total = [], [], {}, 0
    cells = dataset.select_columns([image_column])
    for first in range(0, len(dataset), _READ_BATCH):
        for index, cell in enumerate(cells[first:first + _READ_BATCH][image_column], start=first):
            try:
                pixels = decode_rgb(cell, index)
            except (DataError, *DECODE_ERRORS) as error:  # kept, and raised where the image is drawn
                errors[index] = error
                pixels = torch.empty(0, 0, 3, dtype=torch.uint8)
            if min(pixels.shape[:2]) >= 2 * img_size:
                logger.info(_too_large(min(pixels.shape[:2]), img_size))
                return None
            total += pixels.numel()
            if total > budget_bytes:
                logger.info(f"Images decoded at every draw: the first {index + 1:,} of {len(dataset):,} already "
                            f"take {total / GIB:.2f} GiB decoded, over the budget of {budget}")
                return None
            arrays.append(pixels.reshape(-1))
            shapes.append(pixels.shape[:2])
    sizes = torch.tensor([array.numel() for array in arrays], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    decoded = DecodedImages(torch.cat(arrays), torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2), offsets,
                            errors)
    logger.info(f"Decoded the {len(dataset):,} images once, kept in memory: {decoded.nbytes / 2**20:,.0f} MiB "
                f"in {time.perf_counter() - start:.1f} s (budget {budget})")
    return decoded


def _too_large(short_side: int, img_size: int) -> str:
    return (f"Images decoded at every draw: one is {short_side} px on its short side, at least twice img_size "
            f"{img_size}, so its views come from a reduced-size decode that kept pixels could not reproduce")
