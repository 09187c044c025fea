"""Small image files and dataset folders for the data tests (tests/data/), written into a tmp_path,
and the helpers those tests share."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from hnmix.errors import DataError

PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [128, 128, 128] * 252  # black, red, green, blue, grey...


def palette_image(*, transparent_index: int | None = None) -> Image.Image:
    """P image 12 x 10: left half index 0 (black), right half index 1 (red), bottom row index 2 (green)."""
    indices = np.zeros((10, 12), np.uint8)
    indices[:, 6:] = 1
    indices[-1, :] = 2
    image = Image.fromarray(indices, "P")
    image.putpalette(PALETTE)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def gradient_16bit(width: int = 64, height: int = 8) -> Image.Image:
    """I;16 image whose columns run 0 .. 65535 left to right."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    return Image.fromarray(np.tile(row, (height, 1)))


def write_odd_mode_images(folder: Path) -> dict[str, Path]:
    """One file per awkward mode, in `folder`: name -> path (all 12 x 10 except the 16-bit one)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "L": folder / "grey.png",
        "CMYK": folder / "cmyk.jpg",
        "RGBA": folder / "rgba.png",
        "P": folder / "palette.png",
        "P_transparent": folder / "palette_transparent.png",
        "I;16": folder / "depth16.png",
        "1": folder / "bilevel.png",
        "LA": folder / "grey_alpha.png",
    }
    Image.new("L", (12, 10), 100).save(paths["L"])
    Image.new("CMYK", (12, 10), (255, 0, 0, 0)).save(paths["CMYK"], quality=95)  # cyan
    Image.new("RGBA", (12, 10), (200, 100, 50, 255)).save(paths["RGBA"])
    palette_image().save(paths["P"])
    palette_image(transparent_index=1).save(paths["P_transparent"])
    gradient_16bit().save(paths["I;16"])
    Image.new("1", (12, 10), 1).save(paths["1"])
    Image.new("LA", (12, 10), (100, 0)).save(paths["LA"])
    return paths


def write_image_folder(root: Path, per_class: dict[str, int], size: int = 20) -> Path:
    """root/<class>/<i>.png with a colour per class: datasets' imagefolder layout."""
    rng = np.random.default_rng(0)
    for class_name, count in per_class.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / class_name / f"{i}.png")
    return root


def hub_like_features() -> datasets.Features:
    """The columns of the Hub's ilee0022/Caltech-256: image, label int64, text."""
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64"), "text": datasets.Value("string")}
    )


def write_caltech_like_repo(root: Path, rows_per_split: dict[str, int]) -> Path:
    """A local copy laid out like the Hub dataset repo ilee0022/Caltech-256: one parquet shard
    per split under data/ (data/train-00000-of-00001.parquet ...), written by Dataset.to_parquet,
    so the image column is stored as {bytes, path} structs with the Image feature in the schema."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, count in rows_per_split.items():
        images = [Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)) for _ in range(count)]
        labels = [i % 3 for i in range(count)]
        table = {"image": images, "label": labels, "text": [f"category-{label}" for label in labels]}
        dataset = datasets.Dataset.from_dict(table, features=hub_like_features())
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar10_like_repo(root: Path, rows_per_split: dict[str, int], size: int = 32) -> Path:
    """A local copy laid out like the Hub dataset repo uoft-cs/cifar10 (and ../shared/data/cifar10):
    plain_text/{split}-00000-of-00001.parquet with columns `img` (the Image feature's {bytes, path}
    structs) and `label` (a ClassLabel of CIFAR-10's ten names). Each class has a colour of its own
    under noise, so that a kNN on the pixels does better than chance."""
    (root / "plain_text").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, (len(CIFAR10_CLASSES), 3))
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    for split, count in rows_per_split.items():
        labels = [i % len(CIFAR10_CLASSES) for i in range(count)]
        images = [Image.fromarray(np.clip(colours[label] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8))
                  for label in labels]
        dataset = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        dataset.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root


def raises_one_line(function, *args, **kwargs) -> str:
    """Call `function`, expect a DataError with a one-line message, return the message."""
    with pytest.raises(DataError) as caught:
        function(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def write_folder_with_corrupt_files(root: Path, *, good: int, corrupt: int) -> Path:
    """An image folder of two classes: `good` PNGs and `corrupt` truncated JPEGs in class_0."""
    for i in range(good):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 36), (7 * i % 256, 100, 50)).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "class_0" / f"truncated_{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 then nothing")
    return root
