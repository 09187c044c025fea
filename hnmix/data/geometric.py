"""The geometric half of the augmentation, per image: decode once, crop and flip twice.

`two_crops` cuts two uint8 views [3, img_size, img_size] from an image as `PIL.Image.open` left it
(header read, pixels not yet decoded): each a RandomResizedCrop (scale `AugmentationSpec.crop_scale`,
ratio 3/4-4/3, antialiased bilinear) and a horizontal flip with p=`flip_p`. The draws follow
torchvision's `RandomResizedCrop.get_params` but come from a `random.Random` seeded per sample:
the ten tries of torchvision's draw through torch's global generator cost more than the crop.

Why the crops are drawn before decoding: a JPEG can be decoded at 1/2, 1/4 or 1/8 of its size
(libjpeg's DCT scaling, through simplejpeg or PIL's `draft`), which saves most of the inverse DCT
and colour conversion. The reduction is used only when both crops keep at least img_size pixels
on each side at the reduced size, so a view is never upsampled from a reduced decode where the
full one would have been downsampled; the crop box is then rounded to whole pixels of the reduced
image (under r/2 pixels of the full one). The views are resized by torch's uint8 antialiased
bilinear kernel on channels-last pixels (~2x faster than PIL's resize here; within one level).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from hnmix.data.augmentation import MOCO_V2, AugmentationSpec
from hnmix.data.images import decode_jpeg_upright, to_rgb

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DRAFT_REDUCTIONS = (8, 4, 2)  # JPEG DCT scalings, largest first (libjpeg-turbo's fast ones; all PIL's draft offers)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_REVERSED_X = (2, 3, 6, 7)  # EXIF orientations whose upright x runs against the stored pixels
_REVERSED_Y = (3, 4, 7, 8)  # ... whose upright y does


class Crop(NamedTuple):
    """A crop box in pixels of the upright, full-size image."""

    top: int
    left: int
    height: int
    width: int


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `image` once its EXIF orientation is applied, without decoding it."""
    width, height = image.size
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def random_resized_crop(width: int, height: int, rng: random.Random,
                        scale: tuple[float, ...] = MOCO_V2.crop_scale) -> Crop:
    """torchvision's `RandomResizedCrop.get_params` for a width x height image, drawn from `rng`:
    up to ten tries of an area fraction ~ U[scale] (MoCo v2: [0.2, 1]) and a log-uniform aspect
    ratio in [3/4, 4/3] with a uniform position; when none fits, the largest central crop within
    the ratio range."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return Crop(rng.randint(0, height - crop_height), rng.randint(0, width - crop_width),
                        crop_height, crop_width)
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        crop_width, crop_height = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        crop_width, crop_height = round(height * CROP_RATIO[1]), height
    else:
        crop_width, crop_height = width, height
    return Crop((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def draw_two_crops(width: int, height: int, rng: random.Random, augmentation: AugmentationSpec = MOCO_V2,
                   views: int = 2) -> tuple[list[Crop], list[bool]]:
    """The crop boxes and horizontal flips of `views` views of a width x height upright image, drawn
    from `rng` in the order `two_crops` uses, every crop then every flip (a preview replays them)."""
    crops = [random_resized_crop(width, height, rng, augmentation.crop_scale) for _ in range(views)]
    return crops, [rng.random() < augmentation.flip_p for _ in range(views)]


def draw_one_crop(width: int, height: int, rng: random.Random,
                  augmentation: AugmentationSpec = MOCO_V2) -> tuple[Crop, bool]:
    """The crop box and flip of one view (RandomResizedCrop, then RandomHorizontalFlip)."""
    [crop], [flip] = draw_two_crops(width, height, rng, augmentation, views=1)
    return crop, flip


def draft_reduction(crops: list[Crop], img_size: int) -> int:
    """The largest JPEG decode reduction (8, 4, 2, else 1) at which every crop still spans at
    least img_size pixels in height and width."""
    smallest_side = min(min(crop.height, crop.width) for crop in crops)
    return next((r for r in DRAFT_REDUCTIONS if smallest_side >= r * img_size), 1)


def two_crops(image: Image.Image, img_size: int, rng: random.Random, encoded: Optional[bytes] = None, *,
              augmentation: AugmentationSpec = MOCO_V2, views: int = 2) -> list[torch.Tensor]:
    """A lazily opened image -> `views` uint8 views [3, img_size, img_size], cropped, resized,
    maybe flipped, with `augmentation`'s crop_scale and flip_p.

    `encoded`, the image file's bytes, lets a JPEG be decoded by `decode_jpeg_upright` (faster);
    other images, or without it, are decoded by PIL and made upright 8-bit RGB by `to_rgb`. An
    image that PIL already decoded works too, only not at a reduced size.
    """
    width, height = upright_size(image)
    crops, flips = draw_two_crops(width, height, rng, augmentation, views)
    reduction = draft_reduction(crops, img_size)
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    pixels = decode_jpeg_upright(image, encoded, reduction) if encoded is not None else None  # [h, w, 3]
    if pixels is None:
        stored_size = image.size
        if reduction > 1:
            # Requesting size // r makes PIL's JPEG decoder pick the reduction r (the same on
            # both axes); other formats, and images already decoded, ignore it.
            image.draft("RGB", (stored_size[0] // reduction, stored_size[1] // reduction))
        if image.size == stored_size:
            reduction = 1
        pixels = _pixels(to_rgb(image))
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w], channels-last strides
    # Reduced pixel i covers full pixels [r*i, r*i + r) of the stored image, the last one partly:
    # on an upright axis that runs against the stored one, the partial pixel comes first.
    pad_y = reduction * pixels.shape[2] - height if orientation in _REVERSED_Y else 0
    pad_x = reduction * pixels.shape[3] - width if orientation in _REVERSED_X else 0
    return _cut_views(pixels, crops, flips, img_size, reduction=reduction, pad_y=pad_y, pad_x=pad_x)


def one_crop(image: Image.Image, img_size: int, rng: random.Random, encoded: Optional[bytes] = None, *,
             augmentation: AugmentationSpec = MOCO_V2) -> torch.Tensor:
    """`two_crops` for one view (drawn as `draw_one_crop` draws it), the linear evaluation's."""
    return two_crops(image, img_size, rng, encoded, augmentation=augmentation, views=1)[0]


def two_crops_of_pixels(pixels: torch.Tensor, img_size: int, rng: random.Random, *,
                        augmentation: AugmentationSpec = MOCO_V2, views: int = 2) -> list[torch.Tensor]:
    """Upright uint8 pixels [H, W, 3], already decoded -> the views `two_crops` draws from `rng`.
    For an image that `two_crops` decodes at full size (every crop under 2 * img_size pixels on a
    side, e.g. CIFAR's 32 px at img_size 32), they are equal to its views."""
    height, width = pixels.shape[:2]
    crops, flips = draw_two_crops(width, height, rng, augmentation, views)
    return _cut_views(pixels.permute(2, 0, 1).unsqueeze(0), crops, flips, img_size)


def one_crop_of_pixels(pixels: torch.Tensor, img_size: int, rng: random.Random, *,
                       augmentation: AugmentationSpec = MOCO_V2) -> torch.Tensor:
    """`two_crops_of_pixels` for one view, as `one_crop` draws it."""
    return two_crops_of_pixels(pixels, img_size, rng, augmentation=augmentation, views=1)[0]


def _cut_views(pixels: torch.Tensor, crops: list[Crop], flips: list[bool], img_size: int, *, reduction: int = 1,
               pad_y: int = 0, pad_x: int = 0) -> list[torch.Tensor]:
    """Pixels [1, 3, h, w] decoded at 1/reduction -> the uint8 views [3, img_size, img_size] of
    `crops` (boxes in full-size upright pixels, shifted by pad_y, pad_x), flipped where `flips`."""
    views = []
    for crop, flip in zip(crops, flips):
        top, left = round((crop.top + pad_y) / reduction), round((crop.left + pad_x) / reduction)
        bottom = max(top + 1, round((crop.top + crop.height + pad_y) / reduction))
        right = max(left + 1, round((crop.left + crop.width + pad_x) / reduction))
        view = F.interpolate(pixels[:, :, top:bottom, left:right], size=(img_size, img_size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        views.append(view.flip(-1) if flip else view)
    return views


def _pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [H, W, 3], sharing PIL's bytes."""
    with warnings.catch_warnings():  # read-only: the pixels are only read, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(image))
