"""The photometric half of the augmentation, batched on any device.

The DataLoader workers crop and flip (the geometric half); this module does the rest on a uint8
batch [N, 3, H, W] (N = 2B, both views stacked), with independent parameters per sample, as an
`AugmentationSpec` says: ColorJitter with p=jitter_p, its four ops in a random order per sample
(an op of strength 0 skipped, as torchvision skips it), RandomGrayscale, GaussianBlur, the
normalisation. Drawing (`photometric_params`) is apart from applying (`apply_photometric`), so a
test can replay a draw through torchvision's per-image float ops: they agree within 1/255. The
earlier flip commutes with every op here (symmetric kernel, mirror-symmetric reflect padding).

Why the parameters are drawn on the host: which samples run which op at which position of
their jitter order, and which get blurred, is then known without reading the device, so each
op runs on exactly the samples that need it (gathered with `index_select`, written back with
`index_copy_`) and the step still never waits for the device. Computing every op for the whole
batch at each of the four positions and selecting would cost about five times as much: the hue
adjustment (an HSV round trip) and the 23-tap blur dominate.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import rgb_to_grayscale

from hnmix.data.augmentation import IMAGENET_MEAN, IMAGENET_STD, MOCO_V2, AugmentationSpec
from hnmix.data.transforms import blur_kernel_size

# The jitter ops, numbered as in torchvision's ColorJitter (`fn_idx`).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
ALL_JITTER_OPS = (BRIGHTNESS, CONTRAST, SATURATION, HUE)


class PhotometricParams(NamedTuple):
    """One draw for a batch of n images: jitter_applied, grayscale, blur_applied [n] bool;
    brightness, contrast, saturation [n] float32 factors, hue [n] shift in turns, sigma [n];
    order [n, 4] int64, the order of the jitter ops per row; kernel_size (odd, `blur_kernel_size`);
    jitter_ops, those of strength > 0; mean, std the normalisation."""

    jitter_applied: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur_applied: torch.Tensor
    sigma: torch.Tensor
    kernel_size: int
    jitter_ops: tuple[int, ...] = ALL_JITTER_OPS
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def photometric_params(n: int, img_size: int, *, generator: Optional[torch.Generator] = None,
                       augmentation: AugmentationSpec = MOCO_V2) -> PhotometricParams:
    """Draw the photometric parameters of `augmentation` for n images of side img_size, per
    sample, on the host, from `generator` (default: torch's CPU generator). The same values are
    drawn in the same order whatever the spec (an op that is off draws too)."""
    brightness, contrast, saturation, hue = augmentation.jitter_ranges()

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).mul_(high - low).add_(low)

    def bernoulli(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    jitter_ops = tuple(op for op, strength in zip(ALL_JITTER_OPS, augmentation.jitter) if strength > 0)
    jitter_applied = bernoulli(augmentation.jitter_p)
    return PhotometricParams(
        jitter_applied=jitter_applied if jitter_ops else torch.zeros_like(jitter_applied),
        brightness=uniform(*brightness),
        contrast=uniform(*contrast),
        saturation=uniform(*saturation),
        hue=uniform(*hue),
        # argsort of i.i.d. uniforms is a uniformly random permutation per row.
        order=torch.rand(n, 4, generator=generator).argsort(dim=1),
        grayscale=bernoulli(augmentation.grayscale_p),
        blur_applied=bernoulli(augmentation.blur_p),
        sigma=uniform(*augmentation.blur_sigma),
        kernel_size=blur_kernel_size(img_size),
        jitter_ops=jitter_ops,
        mean=tuple(augmentation.mean),
        std=tuple(augmentation.std),
    )


def apply_photometric(
    images: torch.Tensor, params: PhotometricParams, *, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> [N, 3, H, W] in out_dtype: jitter, grayscale, blur, normalisation.
    The math runs in float32 whatever the autocast state; a channels_last input gives a
    channels_last output."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    if params.brightness.shape[0] != images.shape[0]:
        raise ValueError(f"params were drawn for {params.brightness.shape[0]} images, the batch has {images.shape[0]}")
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    device = images.device
    # Every sample's op at every jitter position, then the blurred ones: host-side row sets,
    # sent to the device in one copy, as are the per-sample values.
    jitter_steps = [(op, rows) for position in range(4) for op in params.jitter_ops
                    if len(rows := (params.jitter_applied & (params.order[:, position] == op)).nonzero().flatten())]
    blurred = params.blur_applied.nonzero().flatten()
    row_sets = _to_device(torch.cat([rows for _, rows in jitter_steps] + [blurred]), device).split(
        [len(rows) for _, rows in jitter_steps] + [len(blurred)])
    values = _to_device(torch.stack([params.brightness, params.contrast, params.saturation, params.hue,
                                     params.sigma, params.grayscale.float()]), device)  # [6, N]
    with torch.autocast(device_type=device.type, enabled=False):
        batch = images.contiguous().to(torch.float32).div_(255)
        for (op, _), rows in zip(jitter_steps, row_sets):  # ops numbered as the rows of `values`
            adjusted = JITTER_OPS[op](batch.index_select(0, rows), values[op].index_select(0, rows))
            batch.index_copy_(0, rows, adjusted)
        batch = torch.where(per_sample(values[5].bool()), rgb_to_grayscale(batch).expand_as(batch), batch)
        if len(blurred):
            rows = row_sets[-1]
            sigma = values[4].index_select(0, rows)
            batch.index_copy_(0, rows, gaussian_blur(batch.index_select(0, rows), params.kernel_size, sigma))
        batch = normalize(batch, params.mean, params.std)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return batch.to(dtype=out_dtype, memory_format=memory_format)


class StepPhotometric:
    """`(view_q, view_k, step) -> (view_q, view_k)`: uint8 [B, 3, S, S] each -> float32, the
    photometric half of a training step on the views' device. The parameters come from a generator
    reseeded from (seed, step, rank) at every step, so a resumed run draws what the uninterrupted
    one did, with no generator state to checkpoint."""

    def __init__(self, img_size: int, *, seed: int, rank: int, augmentation: AugmentationSpec = MOCO_V2):
        self.img_size = img_size
        self.augmentation = augmentation
        self.seed = seed
        self.rank = rank
        self.generator = torch.Generator()

    def __call__(self, view_q: torch.Tensor, view_k: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.generator.manual_seed(random.Random(f"{self.seed}:{step}:{self.rank}").getrandbits(63))
        both = torch.cat([view_q, view_k])
        params = photometric_params(both.shape[0], self.img_size, generator=self.generator,
                                    augmentation=self.augmentation)
        view_q, view_k = apply_photometric(both, params).chunk(2)
        return view_q, view_k


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, 1], to broadcast one value per sample over an image batch."""
    return values.view(-1, 1, 1, 1)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, so that the copy is queued
    behind the running work instead of waiting for it."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _blend(batch: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """batch * ratio + other * (1 - ratio), clamped to [0, 1]; ratio: [N], other broadcasts to batch."""
    ratio = per_sample(ratio)
    return (batch * ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] in [0, 1], factor [N] -> batch * factor, clamped to [0, 1]."""
    return (batch * per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W], factor [N] -> blend of each image with the mean of its grayscale."""
    mean = rgb_to_grayscale(batch).mean(dim=(-3, -2, -1), keepdim=True)  # [N, 1, 1, 1]
    return _blend(batch, mean, factor)


def adjust_saturation(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W], factor [N] -> blend of each image with its own grayscale."""
    return _blend(batch, rgb_to_grayscale(batch), factor)


def adjust_hue(batch: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] in [0, 1], shift [N] in turns -> hue rotated through HSV, as torchvision."""
    hue, saturation, value = _rgb_to_hsv(batch).unbind(dim=-3)
    hue = (hue + shift.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _rgb_to_hsv(batch: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] -> [N, 3, H, W] (h in [0, 1), s, v); torchvision's `_rgb_to_hsv`."""
    red, green, _ = batch.unbind(dim=-3)
    min_c, max_c = torch.aminmax(batch, dim=-3)
    gray = max_c == min_c
    ones = torch.ones_like(max_c)
    chroma = max_c - min_c
    saturation = chroma / torch.where(gray, ones, max_c)
    chroma_divisor = torch.where(gray, ones, chroma).unsqueeze_(dim=-3)
    red_c, green_c, blue_c = ((max_c.unsqueeze(dim=-3) - batch) / chroma_divisor).unbind(dim=-3)
    max_is_not_red = max_c != red
    max_is_green = max_c == green
    hue_g = red_c.add(2.0).sub_(blue_c).mul_(max_is_green & max_is_not_red)
    hue_r = blue_c.sub_(green_c).mul_(~max_is_not_red)
    hue_b = green_c.add_(4.0).sub_(red_c).mul_(max_is_not_red & ~max_is_green)
    hue = hue_r.add_(hue_g).add_(hue_b).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((hue, saturation, max_c), dim=-3)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """h, s, v: [N, H, W] each -> float [N, 3, H, W] RGB, the map of torchvision's `_hsv_to_rgb`,
    as v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (h * 6 + (5, 3, 1)) mod 6: torchvision's
    table lookup gathers through an int64 [N, 3, H, W] index and was ~1.6x slower (within 1e-6)."""
    offsets = torch.tensor((5.0, 3.0, 1.0), dtype=hue.dtype, device=hue.device).view(1, 3, 1, 1)
    k = (hue.unsqueeze(-3) * 6 + offsets).remainder_(6.0)  # [N, 3, H, W]
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    value = value.unsqueeze(-3)
    return ramp.mul_(value * saturation.unsqueeze(-3)).neg_().add_(value)


# The jitter ops by number: float [M, 3, H, W] in [0, 1], values [M] -> adjusted.
JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """sigma [N] -> [N, kernel_size] normalised 1-D Gaussians, torchvision's `_get_gaussian_kernel1d`."""
    half_width = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    offsets = torch.linspace(-half_width, half_width, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(offsets.div(sigma.unsqueeze(1)).pow(2).neg(), dim=1)


def gaussian_blur(batch: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W], sigma [N] -> each image blurred with its own sigma, reflect-padded, in
    two 1-D passes; folded to [1, N*C, H, W], one grouped conv gives each (image, channel) its kernel."""
    n, channels, height, width = batch.shape
    kernels = gaussian_kernels(kernel_size, sigma).repeat_interleave(channels, dim=0)  # [N*C, k]
    pad = kernel_size // 2
    folded = F.pad(batch.reshape(1, n * channels, height, width), [pad, pad, pad, pad], mode="reflect")
    folded = F.conv2d(folded, kernels.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    folded = F.conv2d(folded, kernels.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    return folded.view(n, channels, height, width)


def normalize(batch: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """float [N, 3, H, W] in [0, 1] -> (batch - mean) / std per channel."""
    mean = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    return batch.sub(mean).div_(std)
