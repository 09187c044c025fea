"""hnmix.data.images: every image mode to 8-bit RGB, EXIF orientation.
"""

from __future__ import annotations

import numpy as np
import pytest
from data_images import (
    gradient_16bit,
    palette_image,
    pixels,
    write_odd_mode_images,
)
from PIL import Image

from hnmix.data.images import to_rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_to_rgb_converts_every_awkward_mode_to_8_bit_rgb(tmp_path):
    paths = write_odd_mode_images(tmp_path)
    for name, path in paths.items():
        with Image.open(path) as opened:
            converted = to_rgb(opened)
        assert converted.mode == "RGB", name
    assert (pixels(to_rgb(Image.open(paths["L"]))) == 100).all()
    cyan = pixels(to_rgb(Image.open(paths["CMYK"])))
    assert cyan[..., 0].max() < 20 and cyan[..., 1:].min() > 235
    assert (pixels(to_rgb(Image.open(paths["RGBA"]))) == [200, 100, 50]).all()
    assert (pixels(to_rgb(Image.open(paths["1"]))) == 255).all()
    assert (pixels(to_rgb(Image.open(paths["LA"]))) == 0).all()  # fully transparent -> black


def test_palette_images_keep_their_colours_and_transparency_becomes_black():
    opaque = pixels(to_rgb(palette_image()))
    assert (opaque[0, 0] == [0, 0, 0]).all()
    assert (opaque[0, 11] == [255, 0, 0]).all()
    assert (opaque[9, 0] == [0, 255, 0]).all()
    transparent_red = pixels(to_rgb(palette_image(transparent_index=1)))
    assert (transparent_red[0, 11] == [0, 0, 0]).all()
    assert (transparent_red[9, 0] == [0, 255, 0]).all()


def test_alpha_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = [[255, 0], [128, 64]]
    converted = pixels(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (converted[0, 0] == [200, 100, 50]).all()
    assert (converted[0, 1] == [0, 0, 0]).all()
    assert np.abs(converted[1, 0] - [100, 50, 25]).max() <= 1


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    gradient_16bit().save(tmp_path / "depth.png")
    with Image.open(tmp_path / "depth.png") as opened:
        assert opened.mode == "I;16"
        converted = pixels(to_rgb(opened))
    row = converted[0, :, 0]
    assert row[0] <= 1 and row[-1] >= 254
    assert np.all(np.diff(row) >= 0)
    assert 110 <= row[len(row) // 2] <= 145
    assert (converted[..., 0] == converted[..., 2]).all()


def test_16_bit_big_endian_and_32_bit_integer_grey_use_the_16_bit_scale():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert pixels(to_rgb(big_endian))[0, :, 0].tolist() == [0, 1, 128, 255]
    wide = Image.fromarray(np.array([[0, 257, 32896, 70000]], np.int32))
    assert wide.mode == "I"
    assert pixels(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_and_ycbcr_images_convert():
    floating = Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32))
    assert floating.mode == "F"
    assert pixels(to_rgb(floating))[0, :, 0].tolist() == [0, 100, 255]
    ycbcr = Image.new("RGB", (4, 4), (10, 200, 30)).convert("YCbCr")
    assert np.abs(pixels(to_rgb(ycbcr)) - [10, 200, 30]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert opened.size == (40, 20)
        assert to_rgb(opened).size == (20, 40)
