"""Reading dataset images: open an undecoded `datasets` image cell, make any image 8-bit RGB.

The training views need the image before it is decoded (to decode a JPEG at a reduced size,
see `hnmix.geometric`), so the image column is read with `datasets.Image(decode=False)` and
opened here, lazily.
"""

from __future__ import annotations

import io
import os

import datasets
import numpy as np
from PIL import ExifTags, Image, ImageOps

from hnmix.errors import DataError, first_line


def open_image(cell: dict) -> Image.Image:
    """A `datasets.Image(decode=False)` cell {"bytes", "path"} -> a PIL image, opened lazily
    (header read, pixels not yet decoded). Embedded bytes (parquet) or a local file are opened
    directly; anything else (a remote path) goes through datasets' own decoder."""
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    path = cell.get("path")
    if path and os.path.isfile(path):
        return Image.open(path)
    return datasets.Image().decode_example(cell)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright.

    - EXIF orientation is applied first (`ImageOps.exif_transpose`).
    - Alpha (RGBA, LA, PA, P or L/RGB with a transparency key) is composited onto BLACK:
      a fully transparent pixel becomes (0, 0, 0) whatever colour it hides. (A plain
      `convert("RGB")` would drop the alpha band and keep the hidden colours.)
    - 16/32-bit integer grey (I;16, I;16B, I;16L, I, e.g. 16-bit PNGs) is scaled 0..65535 ->
      0..255 (values outside are clipped); PIL's own conversion clips at 255 instead, which turns
      most of a 16-bit image white.
    - F (float grey) follows PIL: values are taken on the 0..255 scale and clipped.
    - 1, L, P, CMYK, YCbCr, ... use PIL's conversion (CMYK without an ICC profile transform).
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
