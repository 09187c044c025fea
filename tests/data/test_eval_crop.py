"""The evaluation view's crop: crop_pct 1 passes a 32x32 image unchanged at img_size 32 (MoCo's
CIFAR-10 demo evaluates with ToTensor + Normalize alone); the default is ImageNet's resize to
256/224 of img_size, then a centre crop."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD
from hnmix.data.transforms import EVAL_CROP_PCT, eval_transform
from hnmix.errors import ConfigError


def random_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))


def normalised(image: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize with CIFAR-10's statistics: the demo's test transform."""
    return transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)(transforms.ToTensor()(image))


def test_crop_pct_1_leaves_a_32_pixel_image_as_it_is_at_img_size_32():
    image = random_image(32, 32)
    view = eval_transform(32, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)(image)
    assert torch.equal(view, normalised(image))


def test_the_default_crop_is_imagenets_resize_and_centre_crop_which_changes_a_32_pixel_image():
    image = random_image(32, 32)
    view = eval_transform(32, mean=CIFAR10_MEAN, std=CIFAR10_STD)(image)
    assert EVAL_CROP_PCT == 0.875
    # round(32 * 256 / 224) = 37, then the central 32: the image is enlarged and its border cut.
    assert torch.equal(view, normalised(transforms.CenterCrop(32)(transforms.Resize(37)(image))))
    assert not torch.allclose(view, normalised(image), atol=0.1)
    assert eval_transform(224)(random_image(300, 256)).shape == (3, 224, 224)


def test_crop_pct_1_resizes_the_short_side_and_crops_the_long_one():
    image = random_image(40, 32)  # 40 wide, 32 high
    view = eval_transform(32, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)(image)
    assert torch.equal(view, normalised(image.crop((4, 0, 36, 32))))


@pytest.mark.parametrize("crop_pct", [0.0, -0.5, 1.5])
def test_a_crop_outside_0_1_is_refused(crop_pct):
    with pytest.raises(ConfigError, match=r"crop_pct must be in \(0, 1\]"):
        eval_transform(32, crop_pct=crop_pct)
