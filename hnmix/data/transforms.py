"""Per-image transforms: the photometric half of the augmentation, the evaluation crop.

`moco_v2_photometric` (applied to a cropped view) and `eval_transform` take one RGB
`PIL.Image.Image` (see `hnmix.data.images.to_rgb`) and return a float32 tensor
`[3, img_size, img_size]`, normalised (the ImageNet mean and std unless an `AugmentationSpec`,
or the mean and std given, say otherwise). All randomness comes from torch's global CPU generator (torchvision v1
transforms and `RandomGaussianBlur` draw with `torch.rand`, `torch.randint`,
`torch.empty().uniform_`), so `torch.manual_seed` makes a draw repeatable; the caller
(`hnmix.data.two_views.TwoViewDataset`) seeds it per sample. This module knows nothing about MoCo.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from hnmix.data.augmentation import IMAGENET_MEAN, IMAGENET_STD, MOCO_V2, AugmentationSpec
from hnmix.errors import ConfigError

__all__ = ["EVAL_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "RandomGaussianBlur", "blur_kernel_size",
           "eval_transform", "gaussian_blur", "moco_v2_photometric"]

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _check_img_size(img_size: int) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"image size must be a positive integer, got {img_size!r}; pass --img_size N with N >= 1")


def blur_kernel_size(img_size: int) -> int:
    """The Gaussian blur kernel for `img_size`: odd, about 10% of the image side, at least 3.

    This is SimCLR's rule (23 px at 224 px), which MoCo v2 adopted; 64 px -> 7, 32 px -> 3.
    """
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


class RandomGaussianBlur(torch.nn.Module):
    """Gaussian blur of a [C, H, W] float tensor, sigma ~ U[sigma[0], sigma[1]] from torch's RNG.

    The same result as torchvision's `GaussianBlur(kernel_size, sigma)` (same kernel, reflect
    padding, same single draw of sigma), computed as two 1-D passes: 2k instead of k^2
    multiply-adds per pixel. At 224 px (k = 23) on one CPU thread this took the blur from
    ~15 ms to ~3 ms per view; the 2-D blur had been the costliest step of the augmentation.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.kernel_size = (kernel_size, kernel_size)
        self.sigma = tuple(sigma)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return gaussian_blur(image, self.kernel_size[0], sigma)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}"


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
    """The photometric half of the augmentation: one cropped RGB view [img_size x img_size]
    -> [3, img_size, img_size] float32, normalised.

    Recipe (by default Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"),
    after RandomResizedCrop and the horizontal flip (`hnmix.data.geometric.two_crops`; the flip
    commutes with every step here): ColorJitter(augmentation.jitter) with p=jitter_p (MoCo v2:
    0.4, 0.4, 0.4, 0.1 with p=0.8); RandomGrayscale p=grayscale_p (0.2); GaussianBlur sigma ~
    U[blur_sigma] with p=blur_p (0.1-2.0, 0.5); Normalize(augmentation.mean, augmentation.std)
    (ImageNet's). A step with probability 0 (or a jitter of all zeros) is left out, so it costs
    nothing. The conversion to a [0, 1] tensor happens before the blur, which then works in
    float, separably. Each call is an independent draw from torch's global RNG.
    `hnmix.data.photometric` is the same half, batched on the accelerator.
    """
    _check_img_size(img_size)
    steps: list[Callable] = []
    if augmentation.jitter_p and any(augmentation.jitter):
        steps.append(transforms.RandomApply([transforms.ColorJitter(*augmentation.jitter)], p=augmentation.jitter_p))
    if augmentation.grayscale_p:
        steps.append(transforms.RandomGrayscale(p=augmentation.grayscale_p))
    steps.append(transforms.ToTensor())
    if augmentation.blur_p:
        # Kernel: odd, ~10% of the image side, at least 3 (see blur_kernel_size).
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
    crop img_size (the default: 256 then 224, or 37 then 32 at img_size 32).

    crop_pct=1 resizes the short side to img_size and crops the long one only: an image of
    img_size x img_size passes unchanged (torchvision's Resize returns an image of the asked size
    as it is), MoCo's CIFAR-10 demo's test transform (ToTensor, Normalize).
    One RGB image -> [3, img_size, img_size] float32, normalised with `mean` and `std` (pass the
    training's `AugmentationSpec.mean` and `.std`: an encoder sees the statistics it learnt with).
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
