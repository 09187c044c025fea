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
from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD, MOCO_CIFAR10_DEMO, AugmentationSpec
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


OTHER = AugmentationSpec(jitter=(1.2, 0.2, 0.8, 0.5), jitter_p=0.6, grayscale_p=0.4, blur_p=0.9, blur_sigma=(0.5, 3.0),
                         normalize="0.5,0.5,0.5,0.25,0.25,0.25")


def test_another_augmentation_is_read_back_from_the_composed_transform():
    """Every value of the spec reaches torchvision's transforms: the jitter's ranges (those the
    batched half draws from, `jitter_ranges`), each probability, the blur's sigma, the normalisation."""
    jitter_apply, grayscale, _, blur_apply, normalize = moco_v2_photometric(64, OTHER).transforms
    (jitter,) = jitter_apply.transforms
    assert jitter_apply.p == 0.6 and grayscale.p == 0.4 and blur_apply.p == 0.9
    brightness, contrast, saturation, hue = OTHER.jitter_ranges()
    assert (tuple(jitter.brightness), tuple(jitter.contrast), tuple(jitter.saturation), tuple(jitter.hue)) == (
        brightness, contrast, saturation, hue)
    (blur,) = blur_apply.transforms
    assert blur.kernel_size == (7, 7) and blur.sigma == (0.5, 3.0)
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.25, 0.25, 0.25)


def test_steps_with_probability_zero_are_left_out():
    """MoCo's CIFAR-10 demo has no blur: the transform holds none (no draw, no cost); a jitter or
    grayscale probability of 0, or a jitter of all zeros, leaves those out too."""
    kinds = [type(step).__name__ for step in moco_v2_photometric(32, MOCO_CIFAR10_DEMO).transforms]
    assert kinds == ["RandomApply", "RandomGrayscale", "ToTensor", "Normalize"]
    bare = AugmentationSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    assert [type(step).__name__ for step in moco_v2_photometric(32, bare).transforms] == ["ToTensor", "Normalize"]
    still = AugmentationSpec(jitter=(0.0, 0.0, 0.0, 0.0), grayscale_p=0.0, blur_p=0.0)
    assert [type(step).__name__ for step in moco_v2_photometric(32, still).transforms] == ["ToTensor", "Normalize"]


def test_the_demo_views_are_normalised_with_cifar10_statistics_and_never_blurred():
    """Without jitter and grayscale the view is the image normalised with CIFAR-10's mean and std."""
    image = colourful_image(size=32)
    plain = moco_v2_photometric(32, AugmentationSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, normalize="cifar10"))
    expected = transforms.functional.normalize(transforms.functional.to_tensor(image), CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(plain(image), expected, atol=1e-6, rtol=0)


def test_about_grayscale_p_of_views_are_grayscale_for_another_probability():
    """RandomGrayscale p=0.5, jitter off: over 400 seeded draws, 200 expected (sd 10)."""
    transform = moco_v2_photometric(16, AugmentationSpec(jitter_p=0.0, grayscale_p=0.5, blur_p=0.0))
    image = colourful_image(size=16)
    torch.manual_seed(2025)
    grey = 0
    for _ in range(400):
        pixels = unnormalise(transform(image))
        grey += int((pixels.amax(0) - pixels.amin(0)).max() < 1e-4)
    assert 160 <= grey <= 240, grey


def test_eval_transform_normalises_with_the_statistics_given():
    image = colourful_image(size=40)
    default = eval_transform(32)(image)
    cifar = eval_transform(32, mean=CIFAR10_MEAN, std=CIFAR10_STD)(image)
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(cifar * std + mean, unnormalise(default), atol=1e-5, rtol=0)
    assert (cifar - default).abs().max() > 0.05
