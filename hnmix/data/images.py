"""Reading dataset images: open an undecoded `datasets` image cell, decode it as 8-bit RGB.

The image column is read with `datasets.Image(decode=False)` and opened here lazily, so that a
JPEG can be decoded at a reduced size (`hnmix.data.geometric`). `decode_jpeg_upright` decodes a
JPEG with simplejpeg straight into an array: PIL's decoder (the same libjpeg-turbo) unpacks into
4-byte pixels and then needs a copy out, about twice the time for a 768 x 512 JPEG here.
"""

from __future__ import annotations

import io
import os
from typing import Callable, Optional

import datasets
import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image, ImageOps

from hnmix.errors import DataError, first_line


def encoded_bytes(cell: dict) -> Optional[bytes]:
    """The image file of a `datasets.Image(decode=False)` cell {"bytes", "path"}: its embedded
    bytes (parquet), the content of its local file, or None (a remote path)."""
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path")
    if path and os.path.isfile(path):
        with open(path, "rb") as file:
            return file.read()
    return None


def open_image(cell: dict, encoded: Optional[bytes] = None) -> Image.Image:
    """A `datasets.Image(decode=False)` cell -> a PIL image, opened lazily (header read, pixels
    not yet decoded), from `encoded` (`encoded_bytes(cell)` when None); a remote path goes
    through datasets' own decoder."""
    encoded = encoded if encoded is not None else encoded_bytes(cell)
    if encoded is not None:
        return Image.open(io.BytesIO(encoded))
    return datasets.Image().decode_example(cell)


# How PIL and datasets fail on a file that is not a readable image (or one too large to be).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# EXIF orientation -> how to make [H, W, C] pixels upright (as `ImageOps.exif_transpose` does).
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(1),
    3: lambda x: x.flip(0, 1),
    4: lambda x: x.flip(0),
    5: lambda x: x.transpose(0, 1),
    6: lambda x: x.rot90(-1, dims=(0, 1)),
    7: lambda x: x.transpose(0, 1).flip(0, 1),
    8: lambda x: x.rot90(1, dims=(0, 1)),
}


def decode_jpeg_upright(image: Image.Image, encoded: bytes, reduction: int = 1) -> Optional[torch.Tensor]:
    """A JPEG (`encoded`, and PIL's lazy view of it) -> its upright RGB pixels, uint8 [H, W, 3],
    decoded at 1/reduction (1, 2, 4 or 8) of its size (ceil on each side, as PIL's draft); None when
    it is not a YCbCr or grayscale JPEG. Corrupt or truncated data raises ValueError."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    width, height = image.size
    limits = {}
    if reduction > 1:
        limits = dict(min_width=-(-width // reduction), min_height=-(-height // reduction), min_factor=reduction)
    pixels = torch.from_numpy(simplejpeg.decode_jpeg(encoded, colorspace="RGB", **limits))
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in _UPRIGHT:
        pixels = _UPRIGHT[orientation](pixels).contiguous()
    return pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright (EXIF orientation applied).

    Alpha, or a transparency key, is composited onto black: a plain `convert("RGB")` would keep
    the colours transparent pixels hide. 16/32-bit integer grey is scaled 0..65535 -> 0..255: PIL's
    conversion clips at 255, which turns most of a 16-bit image white. Every other mode (F, 1, L,
    P, CMYK, ...) goes through PIL's conversion.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)  # (it would also copy an upright image: skipped)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # rounded 0..65535 -> 0..255
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise DataError(
            f"an image in mode {mode} cannot be converted to RGB ({first_line(error)}); "
            "convert the dataset's images to RGB, L or RGBA"
        ) from None
