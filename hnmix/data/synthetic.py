"""`--dataset synthetic` and `synthetic-hard`: labelled image sets generated in memory as a
`datasets.Dataset`, deterministic given the seed. `synthetic` is easy (an untrained network
already separates it), for the tests and the offline demo; `synthetic-hard` leaves room to tell
methods apart (`python -m hnmix.bench learn`).
"""

from __future__ import annotations

import io

import datasets
import numpy as np
from PIL import Image

from hnmix.errors import DataError

_SYNTHETIC_SPLITS = ("train", "validation", "test")
SYNTHETIC_SOURCES = ("synthetic", "synthetic-hard")  # --dataset names generated in memory


def make_synthetic_dataset(
    size: int, *, seed: int, num_classes: int = 10, image_size: int = 64
) -> datasets.Dataset:
    """Class c is a sinusoidal stripe pattern with its own orientation, frequency and pair of
    colours; each image jitters them, the phase and the brightness, and adds pixel noise. Labels
    balanced and shuffled; columns `image` (RGB PNG, image_size px), `label` (ClassLabel "class_0" ...).
    """
    if size < 1:
        raise DataError(f"synthetic dataset size must be at least 1, got {size}; pass --synthetic_size N with N >= 1")
    if num_classes < 1 or image_size < 1:
        raise DataError(
            f"synthetic dataset needs num_classes >= 1 and image_size >= 1, got {num_classes} and {image_size}"
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64))
    labels = rng.permutation(np.arange(size) % num_classes)

    classes = np.arange(num_classes)
    class_angle = classes * np.pi / num_classes
    class_cycles = 3.0 + 2.0 * (classes % 3)  # stripes per image side
    class_hue = classes / num_classes

    angle = class_angle[labels] + rng.uniform(-0.08, 0.08, size)  # about +-5 degrees
    cycles = class_cycles[labels] * rng.uniform(0.85, 1.15, size)
    phase = rng.uniform(0.0, 2.0 * np.pi, size)
    hue = (class_hue[labels] + rng.uniform(-0.03, 0.03, size)) % 1.0
    brightness = rng.uniform(0.75, 1.0, size)

    def per_image(values: np.ndarray) -> np.ndarray:  # [N] -> [N, 1, 1] float32
        return values.astype(np.float32)[:, None, None]

    axis = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")  # [H, W]
    wave = 2 * np.pi * (per_image(cycles * np.cos(angle)) * x + per_image(cycles * np.sin(angle)) * y)
    stripes = 0.5 + 0.5 * np.sin(wave + per_image(phase))  # [N, H, W] in [0, 1]

    foreground = 255.0 * _hue_to_rgb(hue) * brightness[:, None]  # [N, 3]
    background = 255.0 * 0.25 * _hue_to_rgb((hue + 0.5) % 1.0)  # [N, 3], dark complementary colour
    pixels = np.empty((size, image_size, image_size, 3), np.uint8)
    for channel in range(3):
        start = per_image(background[:, channel])
        span = per_image(foreground[:, channel] - background[:, channel])
        noise = rng.standard_normal((size, image_size, image_size), dtype=np.float32) * 8.0
        pixels[..., channel] = np.clip(start + stripes * span + noise + 0.5, 0, 255)  # + 0.5: round

    return _as_dataset(pixels, labels, [f"class_{c}" for c in range(num_classes)])


def _as_dataset(pixels: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    """pixels [N, H, W, 3] uint8, labels [N] -> columns `image` (uncompressed PNG: fast, and noisy
    pixels barely compress anyway) and `label` (a ClassLabel of `class_names`)."""
    images = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=0)
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def _hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """[N] hue in [0, 1) -> [N, 3] fully saturated RGB in [0, 1]."""
    channel_offsets = np.array([0.0, 2.0 / 3.0, 1.0 / 3.0])
    distance = np.abs(((hue[:, None] + channel_offsets) % 1.0) * 6.0 - 3.0)
    return np.clip(distance - 1.0, 0.0, 1.0)


def _synthetic_split_seed(seed: int, split: str) -> int:
    """train keeps `seed`; validation and test get their own well-mixed seeds, so splits differ."""
    if split == "train":
        return seed
    stream = np.random.SeedSequence(seed % 2**64, spawn_key=(_SYNTHETIC_SPLITS.index(split),))
    return int(stream.generate_state(1, np.uint64)[0])


_GLYPH_CELLS = 4
_GLYPH_SEED = 20201001  # the classes are the same for every --seed; the seed draws the images


def make_hard_synthetic_dataset(
    size: int, *, seed: int, num_classes: int = 16, image_size: int = 64
) -> datasets.Dataset:
    """Class c is a coarse glyph, a fixed 4 x 4 pattern of cells (none equal to another's mirror
    image: the views are flipped), at a random size and position, in a random colour over a plain
    background of another, with noise. An untrained network follows the colours, which say nothing
    about the class (resnet10t at 48 px: 7.4% kNN top-1, chance 6.25%), so training has room to
    climb. (5 x 5 glyphs of 2-6 px cells over shared textures taught nothing: BENCHMARKS.md.)
    """
    if size < 1:
        raise DataError(f"synthetic dataset size must be at least 1, got {size}; pass --synthetic_size N with N >= 1")
    glyphs = _class_glyphs(num_classes)  # [C, 4, 4] bool
    rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64))
    labels = rng.permutation(np.arange(size) % num_classes)
    pixels = np.empty((size, image_size, image_size, 3), np.uint8)
    for i, label in enumerate(labels):
        background = 255.0 * _hue_to_rgb(rng.uniform(0, 1, 1))[0] * rng.uniform(0.2, 0.8)
        image = np.broadcast_to(background.astype(np.float32), (image_size, image_size, 3)).copy()
        cell = max(1, int(rng.uniform(0.16, 0.22) * image_size))
        side = cell * _GLYPH_CELLS
        top, left = rng.integers(0, image_size - side + 1, 2)
        mask = np.kron(glyphs[label], np.ones((cell, cell), bool))  # [side, side]
        colour = 255.0 * _hue_to_rgb(rng.uniform(0, 1, 1))[0] * rng.uniform(0.6, 1.0)
        region = image[top:top + side, left:left + side]
        region[mask] = 0.15 * region[mask] + 0.85 * colour
        image += rng.standard_normal(image.shape, dtype=np.float32) * 10.0
        pixels[i] = np.clip(image + 0.5, 0, 255)
    return _as_dataset(pixels, labels, [f"glyph_{c}" for c in range(num_classes)])


def _class_glyphs(num_classes: int) -> np.ndarray:
    """[C, 4, 4] bool: distinct patterns with 6-10 cells on, none equal to another's mirror image."""
    rng = np.random.default_rng(_GLYPH_SEED)
    glyphs: list[np.ndarray] = []
    while len(glyphs) < num_classes:
        glyph = rng.random((_GLYPH_CELLS, _GLYPH_CELLS)) < 0.5
        if 6 <= glyph.sum() <= 10 and not any((glyph == g).all() or (glyph == g[:, ::-1]).all() for g in glyphs):
            glyphs.append(glyph)
    return np.stack(glyphs)
