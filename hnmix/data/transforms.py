"""Per-image transforms: the photometric half of the augmentation, the evaluation crop.

Both take one RGB `PIL.Image.Image` (`hnmix.data.images.to_rgb`) and return a normalised float32
[3, img_size, img_size]. Their randomness comes from torch's global CPU generator, which
`hnmix.data.two_views.TwoViewDataset` seeds per sample.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from hnmix.data.augmentation import IMAGENET_MEAN, IMAGENET_STD, MOCO_V2, AugmentationSpec
from hnmix.errors import ConfigError

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _check_img_size(img_size: int) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"image size must be a positive integer, got {img_size!r}; pass --img_size N with N >= 1")


def blur_kernel_size(img_size: int) -> int:
    """The Gaussian blur kernel for `img_size`: odd, about 10% of the image side, at least 3.

    This is SimCLR's rule (23 px at 224 px), which MoCo v2 adopted; 64 px -> 7, 32 px -> 3.
    """
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


class RandomGaussianBlur(transforms.GaussianBlur):
    """torchvision's `GaussianBlur` (same kernel, reflect padding, same draw of sigma) on a float
    [C, H, W], computed as two 1-D passes: at 224 px (k = 23) on one CPU thread, ~3 ms a view
    instead of ~15 ms, when the 2-D blur had been the costliest step of the augmentation."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(image, self.kernel_size[0], self.get_params(*self.sigma))


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """[C, H, W] float -> [C, H, W] blurred with a separable Gaussian, reflect-padded borders."""
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    pad = kernel_size // 2
    batch = F.pad(image.unsqueeze(0), [pad, pad, pad, pad], mode="reflect")  # [1, C, H + 2p, W + 2p]
    batch = F.conv2d(batch, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    batch = F.conv2d(batch, kernel.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)
    return batch[0]


def moco_v2_photometric(img_size: int, augmentation: AugmentationSpec = MOCO_V2) -> ImageTransform:
    """The photometric half of the augmentation (MoCo v2's by default) for one cropped RGB view
    -> [3, img_size, img_size] float32: ColorJitter with p=jitter_p, RandomGrayscale, GaussianBlur
    with p=blur_p (after ToTensor: in float, separably), Normalize. A step with probability 0 (or a
    jitter of all zeros) is left out. `hnmix.data.photometric` is the same half, batched."""
    _check_img_size(img_size)
    steps: list[Callable] = []
    if augmentation.jitter_p and any(augmentation.jitter):
        steps.append(transforms.RandomApply([transforms.ColorJitter(*augmentation.jitter)], p=augmentation.jitter_p))
    if augmentation.grayscale_p:
        steps.append(transforms.RandomGrayscale(p=augmentation.grayscale_p))
    steps.append(transforms.ToTensor())
    if augmentation.blur_p:
        blur = RandomGaussianBlur(blur_kernel_size(img_size), sigma=augmentation.blur_sigma)
        steps.append(transforms.RandomApply([blur], p=augmentation.blur_p))
    steps.append(transforms.Normalize(augmentation.mean, augmentation.std))
    return transforms.Compose(steps)


# The evaluation view's centre crop as a fraction of the resized short side (timm's `crop_pct`):
# 224 of 256, ImageNet's protocol since AlexNet.
EVAL_CROP_PCT = 224 / 256


def eval_transform(img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, crop_pct: float = EVAL_CROP_PCT) -> ImageTransform:
    """Deterministic evaluation view: resize the short side to round(img_size / crop_pct), centre
    crop img_size (256 then 224 by default), normalise with `mean` and `std` (the training's).
    crop_pct=1 leaves an img_size x img_size image as it is: MoCo's CIFAR-10 demo's test transform.
    """
    _check_img_size(img_size)
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"the evaluation crop_pct must be in (0, 1], got {crop_pct}")
    return transforms.Compose(
        [
            transforms.Resize(round(img_size / crop_pct)),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(tuple(mean), tuple(std)),
        ]
    )
