"""The photometric half of the MoCo v2 augmentation per image, and the evaluation transform (hnmix/augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from hnmix.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomGaussianBlur,
    blur_kernel_size,
    eval_transform,
    gaussian_blur,
    moco_v2_photometric,
)
from hnmix.errors import ConfigError


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions (the blur) are ~30x slower with 2 intra-op threads on a 2-core machine;
    DataLoader workers run with one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def colourful_image(size: int = 48, seed: int = 0) -> Image.Image:
    """Random colours everywhere, so every crop holds colour (grayscale is then detectable)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.NEAREST)


def unnormalise(view: torch.Tensor) -> torch.Tensor:
    """[3, H, W] normalised -> [3, H, W] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return view * std + mean


def test_photometric_view_has_the_documented_shape_dtype_and_range():
    view = moco_v2_photometric(32)(colourful_image(size=32))
    assert view.shape == (3, 32, 32)
    assert view.dtype == torch.float32
    pixels = unnormalise(view)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_two_calls_are_independent_draws():
    torch.manual_seed(0)
    transform = moco_v2_photometric(32)
    image = colourful_image(size=32)
    assert not torch.equal(transform(image), transform(image))


def test_a_seeded_global_rng_repeats_the_augmentation_exactly():
    transform = moco_v2_photometric(32)
    image = colourful_image(size=32)
    torch.manual_seed(123)
    first = [transform(image) for _ in range(5)]
    torch.manual_seed(123)
    second = [transform(image) for _ in range(5)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_eval_transform_is_deterministic_and_center_crops_to_size():
    image = colourful_image(size=80)
    transform = eval_transform(32)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(1)
    b = transform(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # Resize to round(32 * 256 / 224) = 37, then the central 32 x 32.
    resize = next(t for t in transform.transforms if isinstance(t, transforms.Resize))
    assert resize.size == 37


def test_blur_kernel_is_odd_about_a_tenth_of_the_image_and_at_least_3():
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(8) == 3
    for size in range(1, 400):
        kernel = blur_kernel_size(size)
        assert kernel % 2 == 1 and kernel >= 3 and (kernel == 3 or abs(kernel - 0.1 * size) <= 1)


def test_separable_blur_equals_torchvisions_2d_blur():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 33)
    for kernel_size, sigma in ((3, 0.1), (7, 1.3), (23, 2.0)):
        expected = transforms.functional.gaussian_blur(image, [kernel_size, kernel_size], [sigma, sigma])
        torch.testing.assert_close(gaussian_blur(image, kernel_size, sigma), expected, atol=1e-5, rtol=0)


def test_random_blur_draws_sigma_like_torchvision():
    """One uniform draw of sigma in [0.1, 2.0] from the global RNG, as torchvision does."""
    image = torch.rand(3, 32, 32)
    torch.manual_seed(5)
    blurred = RandomGaussianBlur(7, sigma=(0.1, 2.0))(image)
    torch.manual_seed(5)
    reference = transforms.GaussianBlur(7, sigma=(0.1, 2.0))(image)
    torch.testing.assert_close(blurred, reference, atol=1e-5, rtol=0)


def test_the_recipe_is_moco_v2():
    """The photometric parameters of Chen et al. 2020, read back from the composed transform
    (the crop and flip are hnmix.data.geometric's, tested there)."""
    steps = moco_v2_photometric(64).transforms
    kinds = [type(step).__name__ for step in steps]
    assert kinds == ["RandomApply", "RandomGrayscale", "ToTensor", "RandomApply", "Normalize"]
    jitter_apply, grayscale, _, blur_apply, normalize = steps
    assert jitter_apply.p == 0.8
    (jitter,) = jitter_apply.transforms
    assert jitter.brightness == pytest.approx((0.6, 1.4))
    assert jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    assert grayscale.p == 0.2
    assert blur_apply.p == 0.5
    (blur,) = blur_apply.transforms
    assert blur.kernel_size == (7, 7) and blur.sigma == (0.1, 2.0)
    # The published ImageNet statistics (torchvision's reference scripts, MoCo's main_moco.py).
    assert tuple(normalize.mean) == (0.485, 0.456, 0.406) and tuple(normalize.std) == (0.229, 0.224, 0.225)


def test_about_a_fifth_of_views_are_grayscale():
    """RandomGrayscale p=0.2: over 400 seeded draws, 80 expected (sd 8); colour jitter never
    removes all colour (saturation >= 0.6), so equal channels mean the grayscale step fired."""
    transform = moco_v2_photometric(16)
    image = colourful_image(size=16)
    torch.manual_seed(2024)
    grey = 0
    for _ in range(400):
        pixels = unnormalise(transform(image))
        grey += int((pixels.amax(0) - pixels.amin(0)).max() < 1e-4)
    assert 55 <= grey <= 105, grey


def test_invalid_image_size_is_a_config_error():
    with pytest.raises(ConfigError, match="--img_size"):
        moco_v2_photometric(0)
    with pytest.raises(ConfigError, match="--img_size"):
        eval_transform(-3)
