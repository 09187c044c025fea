"""The geometric half of the MoCo v2 augmentation (hnmix/geometric.py) and lazy image reading
(hnmix/images.py).

The oracle is torchvision: `RandomResizedCrop.get_params` for the crop distribution and its
deterministic fallback, `transforms.functional.resized_crop` (PIL's antialiased bilinear) on the
fully decoded, upright image for the pixels. The crops and flips of a `two_crops` call are
replayed from the same seed: two `random_resized_crop` draws, then two `rng.random() < 0.5`.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps
from torchvision import transforms

import hnmix.data.geometric
from hnmix.data.augmentation import MOCO_CIFAR10_DEMO, AugmentationSpec
from hnmix.data.geometric import (
    Crop,
    draft_reduction,
    draw_two_crops,
    random_resized_crop,
    two_crops,
    upright_size,
)
from hnmix.data.images import decode_jpeg_upright, open_image, to_rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


# ----------------------------------------------------------------------------- helpers


def encode(pixels: np.ndarray, format: str, orientation: int | None = None, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> file bytes, with an EXIF orientation tag unless orientation is None."""
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    options = {"quality": quality} if format == "JPEG" else {}
    Image.fromarray(pixels).save(buffer, format, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def lazy(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def noise_pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_pixels(width: int, height: int, period: float = 200) -> np.ndarray:
    """Red ramps left to right, green top to bottom, blue a 2-D sine of `period` pixels: smooth
    enough for a reduced JPEG decode to stay close to the full one, yet a crop box off by a few
    pixels changes the blue channel by several levels."""
    x, y = np.arange(width), np.arange(height)
    red = np.broadcast_to(255 * x / (width - 1), (height, width))
    green = np.broadcast_to(255 * y[:, None] / (height - 1), (height, width))
    blue = 127.5 + 100 * np.outer(np.cos(2 * np.pi * y / period), np.sin(2 * np.pi * x / period))
    return np.stack([red, green, blue], -1).round().astype(np.uint8)


def replay(seed: int, width: int, height: int) -> tuple[list[Crop], list[bool]]:
    """The crops and flips `two_crops` draws from random.Random(seed) for an upright width x height image."""
    rng = random.Random(seed)
    crops = [random_resized_crop(width, height, rng) for _ in range(2)]
    flips = [rng.random() < 0.5 for _ in range(2)]
    return crops, flips


def reference_views(upright: Image.Image, crops: list[Crop], flips: list[bool], size: int) -> list[torch.Tensor]:
    """torchvision's resized_crop (+ horizontal flip) of the decoded upright image: uint8 [3, S, S]."""
    views = []
    for crop, flip in zip(crops, flips):
        view = TF.resized_crop(upright, crop.top, crop.left, crop.height, crop.width, [size, size], antialias=True)
        tensor = torch.from_numpy(np.array(view)).permute(2, 0, 1)
        views.append(tensor.flip(-1) if flip else tensor)
    return views


def full_upright(data: bytes) -> Image.Image:
    """The fully decoded (no draft), upright RGB image."""
    return ImageOps.exif_transpose(lazy(data).convert("RGB"))


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs().float()


def torchvision_crops(width: int, height: int, n: int, seed: int, scale: tuple[float, float] = SCALE) -> list[Crop]:
    """n draws of torchvision's RandomResizedCrop.get_params, torch's global RNG left as it was."""
    image = torch.empty(1, height, width, dtype=torch.uint8)  # get_params reads only the size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [Crop(*transforms.RandomResizedCrop.get_params(image, list(scale), list(RATIO))) for _ in range(n)]


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_limit(n: int, m: int) -> float:
    """The two-sample KS statistic two samples of one distribution exceed with probability 1e-4."""
    return math.sqrt(-0.5 * math.log(1e-4 / 2)) * math.sqrt((n + m) / (n * m))


def crop_statistics(crops: list[Crop], width: int, height: int) -> dict[str, np.ndarray]:
    """Area fraction, log aspect ratio and position (0..1 along the free range) of each crop."""
    array = np.array(crops, dtype=np.float64)  # columns: top, left, height, width
    top, left, h, w = array.T
    return {
        "area fraction": h * w / (width * height),
        "log aspect ratio": np.log(w / h),
        "top": top[h < height] / (height - h[h < height]),
        "left": left[w < width] / (width - w[w < width]),
    }


# ----------------------------------------------------------------------------- random_resized_crop

N_DRAWS = 3000
SHAPES = [(1000, 1000), (640, 360), (300, 500)]


@pytest.mark.parametrize("width, height", SHAPES)
def test_random_resized_crop_stays_in_the_image_within_scale_and_ratio(width, height):
    """Every crop lies inside the image, with an area fraction in [0.2, 1] and an aspect ratio in
    [3/4, 4/3] up to the rounding of each side to whole pixels (at most half a pixel each)."""
    rng = random.Random(0)
    area = width * height
    for _ in range(N_DRAWS):
        top, left, h, w = random_resized_crop(width, height, rng)
        assert 1 <= h and 1 <= w and 0 <= top and 0 <= left, (top, left, h, w)
        assert top + h <= height and left + w <= width, (top, left, h, w)
        assert (w + 0.5) * (h + 0.5) >= SCALE[0] * area and (w - 0.5) * (h - 0.5) <= area, (h, w)
        assert (w + 0.5) / (h - 0.5) >= RATIO[0] and (w - 0.5) / (h + 0.5) <= RATIO[1], (h, w)


@pytest.mark.parametrize("width, height", SHAPES[:2])
def test_random_resized_crop_follows_torchvision_distribution(width, height):
    """Area fraction, aspect ratio and position have torchvision's distribution (the ten tries
    condition them on fitting, differently for each image shape): the two-sample KS distance to
    torchvision's own draws stays under the value same-distribution samples exceed 1 in 10^4."""
    rng = random.Random(1)
    ours = crop_statistics([random_resized_crop(width, height, rng) for _ in range(N_DRAWS)], width, height)
    theirs = crop_statistics(torchvision_crops(width, height, N_DRAWS, seed=1), width, height)
    for name in ours:
        distance = ks_distance(ours[name], theirs[name])
        assert distance < ks_limit(len(ours[name]), len(theirs[name])), (name, distance)


def test_random_resized_crop_area_fraction_is_uniform_where_every_try_fits():
    """On a square image a try with area fraction f < 3/4 always fits, so f is uniform on
    [0.2, 3/4) there; above, a try fits with probability ln(1/f) / ln(4/3) (|ln ratio| <= ln(1/f)),
    which puts 0.119 / 0.669 = 17.8% of the crops at f >= 3/4.
    Tolerances: over 4 standard deviations for 3000 draws (quartile sd <= 0.0055, share sd 0.007)."""
    rng = random.Random(2)
    crops = [random_resized_crop(1000, 1000, rng) for _ in range(N_DRAWS)]
    fractions = np.array([crop.height * crop.width / 1000**2 for crop in crops])
    below = fractions[fractions < 0.75]
    expected_quartiles = 0.2 + 0.55 * np.array([0.25, 0.5, 0.75])
    np.testing.assert_allclose(np.quantile(below, [0.25, 0.5, 0.75]), expected_quartiles, atol=0.025)
    mass_above = (0.25 + 0.75 * math.log(0.75)) / math.log(4 / 3)  # integral of ln(1/f)/ln(4/3) over [3/4, 1]
    assert abs((fractions >= 0.75).mean() - mass_above / (0.55 + mass_above)) < 0.03


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 0.6)])
def test_random_resized_crop_follows_torchvision_distribution_for_another_scale(scale):
    """--crop_scale reaches the draw: torchvision's distribution for that scale (the KS test
    above), and the area fraction of every crop but the fallback within it, up to the rounding
    of its sides."""
    width, height = 640, 360
    rng = random.Random(3)
    drawn = [random_resized_crop(width, height, rng, scale) for _ in range(N_DRAWS)]
    ours = crop_statistics(drawn, width, height)
    theirs = crop_statistics(torchvision_crops(width, height, N_DRAWS, seed=3, scale=scale), width, height)
    for name in ours:
        distance = ks_distance(ours[name], theirs[name])
        assert distance < ks_limit(len(ours[name]), len(theirs[name])), (name, distance)
    fallback = Crop(0, 80, 360, 480)  # torchvision's central crop when all ten tries miss (it ignores the scale)
    for top, left, h, w in (crop for crop in drawn if crop != fallback):
        assert (w + 0.5) * (h + 0.5) >= scale[0] * width * height and (w - 0.5) * (h - 0.5) <= scale[1] * width * height
    default = crop_statistics([random_resized_crop(width, height, rng) for _ in range(N_DRAWS)], width, height)
    assert ks_distance(ours["area fraction"], default["area fraction"]) > 0.2  # the scale changed the crops


@pytest.mark.parametrize("width, height", [(2000, 1), (1, 2000), (2000, 5), (5, 2000)])
def test_random_resized_crop_falls_back_to_torchvision_central_crop(width, height):
    """When all ten tries fail (a sliver: any area fraction >= 0.2 needs a side longer than the
    short one), the crop is torchvision's deterministic central crop at the nearest allowed ratio."""
    expected = torchvision_crops(width, height, 1, seed=0)[0]
    for seed in range(3):
        assert random_resized_crop(width, height, random.Random(seed)) == expected


# ----------------------------------------------------------------------------- draft_reduction


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (512, 512, 8),  # exactly 8 x 64 on both sides
        (511, 4096, 4),  # one pixel short of 8x on the height
        (4096, 511, 4),  # ... or on the width
        (256, 300, 4),
        (255, 300, 2),
        (128, 128, 2),
        (127, 1000, 1),
        (64, 64, 1),
        (10, 10, 1),  # a crop that will be upsampled
    ],
)
def test_draft_reduction_is_the_largest_keeping_img_size_pixels_per_side(height, width, expected):
    """The largest r in 8/4/2 with min(crop height, width) / r >= img_size, else 1."""
    assert draft_reduction([Crop(0, 0, height, width)], 64) == expected


def test_draft_reduction_is_limited_by_the_smaller_crop():
    """Both views are cut from one decode: the crop with the smallest side sets the reduction."""
    big, small = Crop(0, 0, 1000, 1000), Crop(0, 0, 300, 1000)
    assert draft_reduction([big, small], 64) == draft_reduction([small, big], 64) == 4


# ----------------------------------------------------------------------------- two_crops: fidelity


@pytest.fixture(scope="module")
def noise_png() -> bytes:
    return encode(noise_pixels(130, 90), "PNG")


def test_two_crops_match_torchvision_on_a_png(noise_png):
    """Without a reduced decode, each view is torchvision's resized_crop (+ flip) of the replayed
    crop within one level per pixel. A PNG ignores draft, so a crop that would allow a reduction
    (about half of them here) must still be taken at full scale."""
    size = 32
    reductions = set()
    for seed in range(20):
        crops, flips = replay(seed, 130, 90)
        reductions.add(draft_reduction(crops, size))
        views = two_crops(lazy(noise_png), size, random.Random(seed))
        for view, reference in zip(views, reference_views(full_upright(noise_png), crops, flips, size)):
            assert abs_diff(view, reference).max() <= 1, seed
    assert reductions == {1, 2}  # the seeds cover both cases


@pytest.mark.parametrize("with_bytes", [False, True], ids=["pil", "simplejpeg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_two_crops_come_from_the_upright_image(orientation, with_bytes):
    """A JPEG with an EXIF orientation: the crops are drawn on the upright size and cut from the
    upright pixels, i.e. they match resized_crop of ImageOps.exif_transpose(image) within one level.
    The picture is red on its left half and blue on the right (with a green ramp downwards), so
    a view cut from the raw, unrotated pixels would not match. The crops (at most 120 pixels on a
    side) never allow a reduction at img_size 64: some views are upsampled, some downsampled."""
    size = 64
    pixels = noise_pixels(160, 120) // 8  # a little texture
    pixels[:, :80, 0] += 200
    pixels[:, 80:, 2] += 200
    pixels[..., 1] += np.linspace(0, 200, 120).astype(np.uint8)[:, None]
    data = encode(pixels, "JPEG", orientation)
    upright = full_upright(data)
    assert upright_size(lazy(data)) == upright.size
    for seed in range(4):
        crops, flips = replay(seed, *upright.size)
        assert draft_reduction(crops, size) == 1
        views = two_crops(lazy(data), size, random.Random(seed), data if with_bytes else None)
        for view, reference in zip(views, reference_views(upright, crops, flips, size)):
            assert abs_diff(view, reference).max() <= 1, seed


@pytest.mark.parametrize("orientation", [1, 6])
def test_upright_size_swaps_transposing_orientations_without_decoding(orientation):
    """upright_size reads the EXIF orientation from the header: 5-8 swap width and height."""
    image = lazy(encode(noise_pixels(40, 30), "JPEG", orientation))
    assert upright_size(image) == ((30, 40) if orientation in TRANSPOSED else (40, 30))
    assert image.tile, "upright_size decoded the image"


# ----------------------------------------------------------------------------- two_crops: reduced decode


@pytest.fixture(scope="module")
def smooth_jpegs():
    """JPEG bytes of smooth_pixels, cached per (width, height, orientation)."""
    cache = {}

    def get(width: int, height: int, orientation: int) -> bytes:
        if (width, height, orientation) not in cache:
            cache[width, height, orientation] = encode(smooth_pixels(width, height), "JPEG", orientation)
        return cache[width, height, orientation]

    return get


def check_reduced_decode(data: bytes, size: int, monkeypatch, with_bytes: bool = False) -> None:
    """two_crops decodes `data` at the reduction its crops allow (>1), and every view stays within
    a mean of 2.5 levels per pixel of torchvision's crop of the full decode (2 over all views).

    The differences left are those of the DCT-scaled decode (~1.3 levels on this image). A crop box
    cut at the wrong place in the reduced image (not rescaled, scaled by the other side's ratio,
    or, at r = 8, shifted by one reduced pixel) exceeds these bounds."""
    decoded_sizes = []

    def spy_to_rgb(image):
        upright = to_rgb(image)
        decoded_sizes.append(upright.size)
        return upright

    def spy_decode(image, encoded, reduction):
        pixels = decode_jpeg_upright(image, encoded, reduction)
        decoded_sizes.append((pixels.shape[1], pixels.shape[0]))
        return pixels

    monkeypatch.setattr(hnmix.data.geometric, "to_rgb", spy_to_rgb)
    monkeypatch.setattr(hnmix.data.geometric, "decode_jpeg_upright", spy_decode)
    upright = full_upright(data)
    width, height = upright.size
    differences = []
    for seed in range(6):
        crops, flips = replay(seed, width, height)
        reduction = draft_reduction(crops, size)
        assert reduction > 1
        views = two_crops(lazy(data), size, random.Random(seed), data if with_bytes else None)
        # libjpeg's DCT scaling decodes ceil(size / r) pixels on each side
        assert decoded_sizes[-1] == (math.ceil(width / reduction), math.ceil(height / reduction))
        for view, reference in zip(views, reference_views(upright, crops, flips, size)):
            differences.append(abs_diff(view, reference).mean().item())
    assert max(differences) < 2.5 and np.mean(differences) < 2.0, differences


@pytest.mark.parametrize("with_bytes", [False, True], ids=["pil", "simplejpeg"])
@pytest.mark.parametrize(
    "orientation, size",
    [(1, 64), (6, 64), (1, 200)],  # reductions 8, 8 on the rotated image, 4
)
def test_two_crops_decodes_a_large_jpeg_reduced_and_keeps_the_crop_box(orientation, size, with_bytes, smooth_jpegs,
                                                                      monkeypatch):
    """A 2048 x 1536 JPEG whose crops allow a reduction is decoded at 1/r of its size, and the
    crop box is rescaled to the reduced (and rotated) image: the views stay close to the crops of
    the full decode."""
    check_reduced_decode(smooth_jpegs(2048, 1536, orientation), size, monkeypatch, with_bytes)


@pytest.mark.parametrize("with_bytes", [False, True], ids=["pil", "simplejpeg"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_two_crops_keeps_the_crop_box_when_the_size_is_not_a_multiple_of_the_reduction(
    orientation, with_bytes, smooth_jpegs, monkeypatch
):
    """2049 x 1537: the reduced decode is 257 x 193, its last pixel covering a single full pixel.
    A full pixel x sits at x / r in the reduced image (at (x + pad) / r on an axis the EXIF
    orientation reverses, pad = r * ceil(W / r) - W), not at x * ceil(W / r) / W."""
    check_reduced_decode(smooth_jpegs(2049, 1537, orientation), 64, monkeypatch, with_bytes)


# ----------------------------------------------------------------------------- decode_jpeg_upright


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("reduction", [1, 2, 8])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_decode_jpeg_upright_gives_the_pixels_pil_gives(mode, reduction, orientation):
    """simplejpeg and PIL run the same libjpeg-turbo: for a colour or grayscale JPEG, at full size
    or DCT-scaled, the upright RGB pixels agree (within one level) with PIL's draft + to_rgb."""
    pixels = smooth_pixels(203, 150)
    data = encode(pixels if mode == "RGB" else pixels[..., 1], "JPEG", orientation)
    decoded = decode_jpeg_upright(lazy(data), data, reduction)
    reference = lazy(data)
    if reduction > 1:
        reference.draft("RGB", (reference.size[0] // reduction, reference.size[1] // reduction))
    expected = torch.from_numpy(np.array(to_rgb(reference)))
    assert decoded.dtype == torch.uint8 and decoded.shape == expected.shape
    assert abs_diff(decoded, expected).max() <= 1


def test_decode_jpeg_upright_leaves_cmyk_jpegs_and_other_formats_to_pil(noise_png):
    """CMYK JPEGs and PNGs return None; two_crops then decodes them with PIL, from the same bytes."""
    cmyk = io.BytesIO()
    Image.fromarray(noise_pixels(40, 30)).convert("CMYK").save(cmyk, format="JPEG")
    for data in (cmyk.getvalue(), noise_png):
        assert decode_jpeg_upright(lazy(data), data) is None
        views = two_crops(lazy(data), 16, random.Random(0), data)
        assert len(views) == 2 and views[0].shape == (3, 16, 16)


def test_a_truncated_jpeg_is_an_error_not_grey_pixels():
    """libjpeg fills a truncated JPEG with grey and warns; simplejpeg's strict mode makes that a
    ValueError, which the dataset reports and replaces like PIL's OSError."""
    data = encode(noise_pixels(64, 48), "JPEG")
    truncated = data[: len(data) // 2]
    with pytest.raises(ValueError):
        decode_jpeg_upright(lazy(truncated), truncated)


def test_two_crops_of_an_already_decoded_jpeg_use_the_full_pixels(smooth_jpegs):
    """An image loaded before two_crops cannot be drafted: its views are the full-scale crops,
    within one level of torchvision's, although the crops would allow a reduction of 8."""
    data = smooth_jpegs(2048, 1536, 1)
    image = lazy(data)
    image.load()
    crops, flips = replay(0, 2048, 1536)
    assert draft_reduction(crops, 64) == 8
    views = two_crops(image, 64, random.Random(0))
    assert image.size == (2048, 1536)
    for view, reference in zip(views, reference_views(full_upright(data), crops, flips, 64)):
        assert abs_diff(view, reference).max() <= 1


# ----------------------------------------------------------------------------- two_crops: output


def test_two_crops_output_is_two_contiguous_uint8_views(noise_png):
    """Two uint8 [3, S, S] contiguous tensors, ready to batch (or to hand to PIL)."""
    views = two_crops(lazy(noise_png), 24, random.Random(0))
    assert len(views) == 2
    for view in views:
        assert view.dtype == torch.uint8 and view.shape == (3, 24, 24) and view.is_contiguous()


def test_two_crops_flips_half_the_views_independently():
    """On a left-to-right red ramp, a view is flipped iff its left column is redder than its right.
    Over 300 calls: 600 views flipped with p = 0.5 (300 +- 60, 5 sd) and each of the four
    (flip, flip) combinations of a call with p = 1/4 (75 +- 35, 4.7 sd)."""
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(64) * 4
    data = encode(pixels, "PNG")
    pairs = []
    for seed in range(300):
        views = two_crops(lazy(data), 16, random.Random(seed))
        pairs.append(tuple(bool(v[0, :, 0].float().mean() > v[0, :, -1].float().mean()) for v in views))
    assert abs(sum(map(sum, pairs)) - 300) <= 60
    for combination in [(False, False), (False, True), (True, False), (True, True)]:
        assert abs(pairs.count(combination) - 75) <= 35, combination


@pytest.mark.parametrize("flip_p", [0.0, 0.25, 1.0])
def test_two_crops_flip_with_the_augmentations_flip_p(flip_p):
    """--flip_p reaches the workers' crops: never, a quarter of the views (150 +- 45 of 600, 5 sd), always."""
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(64) * 4
    data = encode(pixels, "PNG")
    augmentation = AugmentationSpec(flip_p=flip_p)
    flipped = 0
    for seed in range(300):
        views = two_crops(lazy(data), 16, random.Random(seed), augmentation=augmentation)
        flipped += sum(bool(v[0, :, 0].float().mean() > v[0, :, -1].float().mean()) for v in views)
    assert abs(flipped - 600 * flip_p) <= 45, flipped


def test_two_crops_of_another_augmentation_match_torchvision_on_a_png(noise_png):
    """The crops and flips `draw_two_crops` replays for a spec are those `two_crops` cut: each view
    is torchvision's resized_crop (+ flip) of them within one level (MoCo's CIFAR-10 demo's scale)."""
    size = 32
    for seed in range(20):
        crops, flips = draw_two_crops(130, 90, random.Random(seed), MOCO_CIFAR10_DEMO)
        views = two_crops(lazy(noise_png), size, random.Random(seed), augmentation=MOCO_CIFAR10_DEMO)
        for view, reference in zip(views, reference_views(full_upright(noise_png), crops, flips, size)):
            assert abs_diff(view, reference).max() <= 1, seed
    assert draw_two_crops(130, 90, random.Random(0), MOCO_CIFAR10_DEMO) != draw_two_crops(130, 90, random.Random(0))


def test_two_crops_is_reproducible_per_seed_and_draws_two_different_views(noise_png):
    """The same seed gives identical views; within a call the two views are independent draws
    (different crops), and different seeds give different views."""
    for seed in range(10):
        first = two_crops(lazy(noise_png), 24, random.Random(seed))
        again = two_crops(lazy(noise_png), 24, random.Random(seed))
        other = two_crops(lazy(noise_png), 24, random.Random(seed + 100))
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert not torch.equal(first[0], first[1])
        assert not torch.equal(first[0], other[0])


# ----------------------------------------------------------------------------- images.py


@pytest.mark.parametrize("where", ["bytes", "path"])
def test_open_image_opens_a_cell_lazily_so_draft_applies(where, tmp_path):
    """A datasets Image(decode=False) cell, with embedded bytes (and a path name that is not a
    local file, as in parquet) or with a local path, opens without decoding (the tile list is
    still there), so a JPEG can then be decoded at a reduced size."""
    data = encode(smooth_pixels(256, 128), "JPEG")
    if where == "bytes":
        cell = {"bytes": data, "path": "not_a_local_file.jpg"}
    else:
        (tmp_path / "image.jpg").write_bytes(data)
        cell = {"bytes": None, "path": str(tmp_path / "image.jpg")}
    image = open_image(cell)
    assert image.format == "JPEG" and image.size == (256, 128)
    assert image.tile, "the image was decoded on opening"
    image.draft("RGB", (64, 32))
    assert np.asarray(image).shape == (32, 64, 3)


def test_open_image_reads_the_pixels_of_a_bytes_cell():
    """The opened image decodes to the stored pixels (lossless PNG)."""
    pixels = noise_pixels(20, 10)
    assert np.array_equal(np.asarray(open_image({"bytes": encode(pixels, "PNG"), "path": None})), pixels)


@pytest.mark.parametrize("with_exif", [False, True])
def test_to_rgb_returns_an_upright_rgb_image_itself(with_exif):
    """An RGB image without an EXIF orientation (or with orientation 1) is returned as it is: not
    copied, not transposed, not decoded - so a later draft still applies."""
    image = lazy(encode(noise_pixels(40, 30), "JPEG", orientation=1 if with_exif else None))
    assert image.getexif().get(ExifTags.Base.Orientation) == (1 if with_exif else None)
    assert to_rgb(image) is image
    assert image.tile, "to_rgb decoded the image"


def test_to_rgb_rotates_an_orientation_6_image():
    """Orientation 6 (rotate 90 degrees clockwise to display) is applied: the result is what
    ImageOps.exif_transpose gives, height and width swapped."""
    data = encode(noise_pixels(40, 30), "JPEG", orientation=6)
    rotated = to_rgb(lazy(data))
    assert rotated.size == (30, 40)
    assert np.array_equal(np.asarray(rotated), np.asarray(ImageOps.exif_transpose(lazy(data))))
