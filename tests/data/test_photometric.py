"""The batched photometric augmentation (hnmix/data/photometric.py), MoCo v2's and others.

The oracle is torchvision's own per-image float ops (`transforms.v2.functional`), replayed with
the same parameters: the batched result must agree within 1/255 per pixel before normalisation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import hnmix.data.photometric
from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD, MOCO_CIFAR10_DEMO, AugmentationSpec
from hnmix.data.photometric import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    PhotometricParams,
    StepPhotometric,
    apply_photometric,
    photometric_params,
)
from hnmix.data.transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

ONE_LEVEL = 1 / 255
ALL_PERMUTATIONS = list(itertools.permutations(range(4)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def varied_images(size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 [8, 3, size, size]: the content that stresses each op.

    Smooth colour gradients; uniform noise; pure grays (hue undefined, max == min); saturated
    primaries in blocks; near-black and near-white noise (clamping); low-chroma noise around
    mid-gray (hue ill-conditioned); a hue wheel (every sextant boundary); a half-black image.
    """
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    gradients = torch.stack((x, y, 1 - x * y)) * 255
    noise = torch.randint(0, 256, (3, size, size), generator=generator).float()
    grays = (x * 255).expand(3, size, size)
    primaries = torch.tensor([[255.0, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])
    blocks = primaries[(torch.arange(size) // (size // 4)).remainder(4)].T.unsqueeze(1).expand(3, size, size)
    extremes = torch.where(
        torch.rand(1, size, size, generator=generator) < 0.5,
        torch.randint(0, 6, (3, size, size), generator=generator),
        torch.randint(250, 256, (3, size, size), generator=generator),
    ).float()
    low_chroma = 128 + torch.randint(-2, 3, (3, size, size), generator=generator).float()
    angle = torch.atan2(y - 0.5, x - 0.5)
    wheel = torch.stack([torch.cos(angle + shift) for shift in (0, 2 * math.pi / 3, 4 * math.pi / 3)]) * 127.5 + 127.5
    half_black = gradients * (x < 0.5)
    batch = torch.stack((gradients, noise, grays, blocks, extremes, low_chroma, wheel, half_black))
    return batch.round().clamp(0, 255).to(torch.uint8)


def torchvision_reference(images: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W] in [0, 1], unnormalised: torchvision, one image at a time."""
    jitter_ops = {
        BRIGHTNESS: (TF.adjust_brightness, params.brightness),
        CONTRAST: (TF.adjust_contrast, params.contrast),
        SATURATION: (TF.adjust_saturation, params.saturation),
        HUE: (TF.adjust_hue, params.hue),
    }
    k = params.kernel_size
    results = []
    for i, image in enumerate(images):
        image = TF.to_dtype(image, torch.float32, scale=True)
        if params.jitter_applied[i]:
            for op in params.order[i].tolist():
                if op not in params.jitter_ops:  # a strength of 0: torchvision's ColorJitter skips the op
                    continue
                function, factors = jitter_ops[op]
                image = function(image, float(factors[i]))
        if params.grayscale[i]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur_applied[i]:
            sigma = float(params.sigma[i])
            image = TF.gaussian_blur(image, [k, k], [sigma, sigma])
        results.append(image)
    return torch.stack(results)


def unnormalise(batch: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """[N, 3, H, W] normalised with mean and std (ImageNet's) -> [N, 3, H, W] float32 in the [0, 1] scale."""
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return batch.float() * std + mean


def fixed_params(n: int, kernel_size: int = 3, **overrides) -> PhotometricParams:
    """Parameters that do nothing (no jitter, grayscale or blur), with `overrides` replacing fields."""
    generator = torch.Generator().manual_seed(1234)
    params = PhotometricParams(
        jitter_applied=torch.zeros(n, dtype=torch.bool),
        brightness=torch.empty(n).uniform_(0.6, 1.4, generator=generator),
        contrast=torch.empty(n).uniform_(0.6, 1.4, generator=generator),
        saturation=torch.empty(n).uniform_(0.6, 1.4, generator=generator),
        hue=torch.empty(n).uniform_(-0.1, 0.1, generator=generator),
        order=torch.arange(4).repeat(n, 1),
        grayscale=torch.zeros(n, dtype=torch.bool),
        blur_applied=torch.zeros(n, dtype=torch.bool),
        sigma=torch.empty(n).uniform_(0.1, 2.0, generator=generator),
        kernel_size=kernel_size,
    )
    return params._replace(**overrides)


def max_error(images: torch.Tensor, params: PhotometricParams) -> float:
    batched = unnormalise(apply_photometric(images, params), params.mean, params.std)
    return (batched - torchvision_reference(images, params)).abs().max().item()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_draws_match_torchvision_within_one_level(seed):
    """The acceptance criterion: any draw, replayed per image through torchvision, agrees within 1/255."""
    images = torch.cat([varied_images(seed=seed)] * 4)  # 32 images, so every option is drawn often
    params = photometric_params(len(images), 32, generator=torch.Generator().manual_seed(seed))
    assert params.jitter_applied.any() and params.grayscale.any() and params.blur_applied.any()
    assert max_error(images, params) <= ONE_LEVEL


def test_jitter_in_every_order_matches_torchvision():
    """All 24 orders of the four jitter ops, each on all the varied images, with drawn factors."""
    images = varied_images().repeat(len(ALL_PERMUTATIONS), 1, 1, 1)
    n = len(images)
    drawn = photometric_params(n, 32, generator=torch.Generator().manual_seed(5))
    order = torch.tensor(ALL_PERMUTATIONS).repeat_interleave(8, dim=0)
    params = drawn._replace(
        jitter_applied=torch.ones(n, dtype=torch.bool),
        order=order,
        grayscale=torch.zeros(n, dtype=torch.bool),
        blur_applied=torch.zeros(n, dtype=torch.bool),
    )
    assert max_error(images, params) <= ONE_LEVEL


@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE])
@pytest.mark.parametrize("extreme", [False, True])
def test_each_jitter_op_alone_matches_torchvision(op, extreme):
    """One op active (the others at their identity factor), at drawn factors or at the range ends."""
    images = varied_images().repeat(2, 1, 1, 1)
    n = len(images)
    identity = {BRIGHTNESS: 1.0, CONTRAST: 1.0, SATURATION: 1.0, HUE: 0.0}
    ends = {BRIGHTNESS: (0.6, 1.4), CONTRAST: (0.6, 1.4), SATURATION: (0.6, 1.4), HUE: (-0.1, 0.1)}
    params = fixed_params(n, jitter_applied=torch.ones(n, dtype=torch.bool))
    names = {BRIGHTNESS: "brightness", CONTRAST: "contrast", SATURATION: "saturation", HUE: "hue"}
    for other in identity:
        if other != op:
            params = params._replace(**{names[other]: torch.full((n,), identity[other])})
    if extreme:
        params = params._replace(**{names[op]: torch.tensor(ends[op]).repeat_interleave(n // 2)})
    assert max_error(images, params) <= ONE_LEVEL


def test_grayscale_alone_matches_torchvision_and_has_equal_channels():
    images = varied_images()
    params = fixed_params(8, grayscale=torch.tensor([True, False] * 4))
    assert max_error(images, params) <= ONE_LEVEL
    out = unnormalise(apply_photometric(images, params))
    gray = out[0::2]
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 7, blur_kernel_size(224)])
def test_blur_alone_matches_torchvision(kernel_size):
    """Per-sample sigma across the range, including the ends, with reflect-padded borders."""
    images = varied_images()
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.3, 1.2, 1.9])
    params = fixed_params(8, kernel_size, blur_applied=torch.tensor([True] * 7 + [False]), sigma=sigma)
    assert max_error(images, params) <= ONE_LEVEL


def test_no_op_is_exactly_the_normalised_input():
    """No jitter, grayscale or blur: the image is only converted and normalised (to float rounding)."""
    images = varied_images()
    out = apply_photometric(images, fixed_params(8))
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert (out - expected).abs().max().item() <= 1e-6


def draw_many(n: int = 20_000, seed: int = 0) -> PhotometricParams:
    return photometric_params(n, 224, generator=torch.Generator().manual_seed(seed))


def test_application_probabilities_are_the_recipe():
    params = draw_many()
    assert params.jitter_applied.float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert params.grayscale.float().mean().item() == pytest.approx(0.2, abs=0.02)
    assert params.blur_applied.float().mean().item() == pytest.approx(0.5, abs=0.02)
    both = (params.jitter_applied & params.grayscale).float().mean().item()
    assert both == pytest.approx(0.8 * 0.2, abs=0.02), "jitter and grayscale are drawn independently"


@pytest.mark.parametrize(
    "field, low, high",
    [
        ("brightness", 0.6, 1.4),
        ("contrast", 0.6, 1.4),
        ("saturation", 0.6, 1.4),
        ("hue", -0.1, 0.1),
        ("sigma", 0.1, 2.0),
    ],
)
def test_factors_are_uniform_on_their_ranges(field, low, high):
    values = getattr(draw_many(), field)
    assert values.dtype == torch.float32
    assert values.min().item() >= low and values.max().item() <= high
    assert values.mean().item() == pytest.approx((low + high) / 2, abs=0.02 * (high - low))
    quarter_counts = torch.histc(values, bins=4, min=low, max=high) / len(values)
    assert torch.allclose(quarter_counts, torch.full((4,), 0.25), atol=0.02)


def test_order_is_a_uniform_permutation_per_sample():
    order = draw_many().order
    assert order.shape == (20_000, 4)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))
    for position in range(4):
        counts = torch.bincount(order[:, position], minlength=4).float() / len(order)
        assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02), (position, counts)


def test_every_sample_gets_its_own_parameters():
    """Two views of one image in one batch get different draws, and so different pixels."""
    params = photometric_params(2, 32, generator=torch.Generator().manual_seed(0))
    for field in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert getattr(params, field)[0] != getattr(params, field)[1]
    many = draw_many()
    neighbours = torch.corrcoef(torch.stack((many.brightness[0::2], many.brightness[1::2])))[0, 1]
    assert abs(neighbours.item()) < 0.05
    image = varied_images()[:1].repeat(2, 1, 1, 1)
    out = apply_photometric(image, photometric_params(2, 32, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(out[0], out[1])


def test_seeded_generator_repeats_the_draw_exactly():
    first = photometric_params(64, 32, generator=torch.Generator().manual_seed(7))
    again = photometric_params(64, 32, generator=torch.Generator().manual_seed(7))
    other = photometric_params(64, 32, generator=torch.Generator().manual_seed(8))
    for field in PhotometricParams._fields:
        value = getattr(first, field)
        assert torch.equal(value, getattr(again, field)) if isinstance(value, torch.Tensor) else \
            value == getattr(again, field), field
    assert not torch.equal(first.brightness, other.brightness)
    assert first.kernel_size == blur_kernel_size(32)


def test_runs_in_float32_under_autocast_and_returns_the_requested_dtype():
    images = varied_images()
    params = photometric_params(8, 32, generator=torch.Generator().manual_seed(2))
    reference = apply_photometric(images, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = apply_photometric(images, params)
        as_bf16 = apply_photometric(images, params, out_dtype=torch.bfloat16)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference), "autocast must not lower the math to bf16"
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, reference.to(torch.bfloat16)), "bf16 is only the final cast"


def test_channels_last_in_gives_channels_last_out_with_the_same_values():
    images = varied_images()
    params = photometric_params(8, 32, generator=torch.Generator().manual_seed(4))
    contiguous = apply_photometric(images, params)
    channels_last = apply_photometric(images.contiguous(memory_format=torch.channels_last), params)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert contiguous.is_contiguous()
    assert torch.equal(channels_last, contiguous)


def test_rejects_a_batch_it_cannot_read():
    images = varied_images()
    params = fixed_params(8)
    with pytest.raises(ValueError, match="uint8"):
        apply_photometric(images.float(), params)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        apply_photometric(images[:, :1], params)
    with pytest.raises(ValueError, match="drawn for 8"):
        apply_photometric(images[:4], params)


def test_step_photometric_is_seeded_by_seed_step_and_rank():
    """The trainer's batched half redraws the same parameters for the same (seed, step, rank), so a
    resumed run augments exactly as the uninterrupted one; another step or rank draws anew."""
    generator = torch.Generator().manual_seed(0)
    view_q, view_k = (torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=generator) for _ in range(2))
    first = StepPhotometric(16, seed=1, rank=0)
    out_q, out_k = first(view_q, view_k, step=5)
    assert out_q.shape == out_k.shape == (3, 3, 16, 16) and out_q.dtype == torch.float32
    again_q, again_k = StepPhotometric(16, seed=1, rank=0)(view_q, view_k, step=5)
    assert torch.equal(out_q, again_q) and torch.equal(out_k, again_k)
    for other in (first(view_q, view_k, step=6), StepPhotometric(16, seed=1, rank=1)(view_q, view_k, step=5)):
        assert not torch.equal(out_q, other[0])
    same_input_views = first(view_q, view_q, step=5)
    assert not torch.equal(same_input_views[0], same_input_views[1])  # the two views get their own parameters


# ----------------------------------------------------------------------------- other augmentations

# Every value away from MoCo v2's: strong, uneven jitter (a brightness over 1, the largest hue),
# likelier grayscale and blur, a wider sigma, another normalisation.
OTHER = AugmentationSpec(crop_scale=(0.08, 1.0), flip_p=0.3, jitter=(1.2, 0.2, 0.8, 0.5), jitter_p=0.6,
                         grayscale_p=0.4, blur_p=0.9, blur_sigma=(0.5, 3.0), normalize="cifar10")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("augmentation", [OTHER, MOCO_CIFAR10_DEMO, AugmentationSpec(jitter=(0.0, 0.4, 0.0, 0.3))],
                         ids=["other", "cifar10-demo", "two-ops-off"])
def test_random_draws_of_other_augmentations_match_torchvision_within_one_level(seed, augmentation):
    """The acceptance criterion for any spec: its draws, replayed per image through torchvision
    (an op of strength 0 skipped, as ColorJitter does), agree within 1/255 before normalisation."""
    images = torch.cat([varied_images(seed=seed)] * 4)
    params = photometric_params(len(images), 32, generator=torch.Generator().manual_seed(seed),
                                augmentation=augmentation)
    assert params.jitter_applied.any() and params.grayscale.any()
    assert (params.mean, params.std) == (augmentation.mean, augmentation.std)
    assert max_error(images, params) <= ONE_LEVEL


def test_other_augmentations_draw_their_probabilities_and_ranges():
    params = photometric_params(20_000, 224, generator=torch.Generator().manual_seed(0), augmentation=OTHER)
    for field, p in (("jitter_applied", 0.6), ("grayscale", 0.4), ("blur_applied", 0.9)):
        assert getattr(params, field).float().mean().item() == pytest.approx(p, abs=0.02), field
    ranges = dict(zip(("brightness", "contrast", "saturation", "hue"), OTHER.jitter_ranges())) | {"sigma": (0.5, 3.0)}
    assert ranges["brightness"] == (0.0, 2.2)  # 1 - 1.2 stops at 0, as in torchvision
    for field, (low, high) in ranges.items():
        values = getattr(params, field)
        assert values.min().item() >= low and values.max().item() <= high, field
        assert values.mean().item() == pytest.approx((low + high) / 2, abs=0.02 * (high - low)), field


def test_a_jitter_op_of_strength_zero_is_never_run(monkeypatch):
    """jitter (0, 0.4, 0, 0.3): only contrast and hue run, whatever the order drawn."""
    ran = []
    ops = {op: (lambda function: lambda batch, values: ran.append(function.__name__) or function(batch, values))(f)
           for op, f in hnmix.data.photometric.JITTER_OPS.items()}
    monkeypatch.setattr(hnmix.data.photometric, "JITTER_OPS", ops)
    augmentation = AugmentationSpec(jitter=(0.0, 0.4, 0.0, 0.3), jitter_p=1.0)
    params = photometric_params(8, 32, generator=torch.Generator().manual_seed(0), augmentation=augmentation)
    assert params.jitter_ops == (CONTRAST, HUE)
    apply_photometric(varied_images(), params)
    assert sorted(set(ran)) == ["adjust_contrast", "adjust_hue"]


def test_all_jitter_strengths_zero_or_probability_zero_jitters_nothing():
    for augmentation in (AugmentationSpec(jitter=(0.0, 0.0, 0.0, 0.0)), AugmentationSpec(jitter_p=0.0)):
        params = photometric_params(64, 32, generator=torch.Generator().manual_seed(0), augmentation=augmentation)
        assert not params.jitter_applied.any()


def test_blur_p_zero_never_blurs_and_costs_no_blur(monkeypatch):
    """MoCo's CIFAR-10 demo has no blur: no sample draws it, and the blur kernel never runs."""
    def no_blur(*args, **kwargs):
        raise AssertionError("the blur ran with blur_p 0")

    monkeypatch.setattr(hnmix.data.photometric, "gaussian_blur", no_blur)
    step = StepPhotometric(32, seed=0, rank=0, augmentation=MOCO_CIFAR10_DEMO)
    images = varied_images()
    for step_index in range(20):
        step(images, images, step_index)
    params = photometric_params(10_000, 32, generator=torch.Generator().manual_seed(0), augmentation=MOCO_CIFAR10_DEMO)
    assert not params.blur_applied.any()


def test_the_views_are_normalised_with_the_augmentations_statistics():
    """No jitter, grayscale or blur drawn: the output is the input normalised with CIFAR-10's mean and std."""
    images = varied_images()
    params = fixed_params(8)._replace(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(CIFAR10_MEAN), list(CIFAR10_STD))
    assert (apply_photometric(images, params) - expected).abs().max().item() <= 1e-6
    step = StepPhotometric(32, seed=0, rank=0, augmentation=AugmentationSpec(jitter_p=0.0, grayscale_p=0.0,
                                                                              blur_p=0.0, normalize="cifar10"))
    view_q, view_k = step(images, images, step=0)
    assert (view_q - expected).abs().max().item() <= 1e-6 and (view_k - expected).abs().max().item() <= 1e-6


def test_moco_v2_draws_what_every_earlier_hnmix_drew():
    """A checkpoint of an earlier hnmix resumes with the same batched views: the default spec
    draws the same values in the same order as the fixed recipe did (its literal constants here)."""
    n, generator = 64, torch.Generator().manual_seed(11)

    def uniform(low, high):
        return torch.rand(n, generator=generator).mul_(high - low).add_(low)

    def bernoulli(p):
        return torch.rand(n, generator=generator) < p

    earlier = [bernoulli(0.8), uniform(0.6, 1.4), uniform(0.6, 1.4), uniform(0.6, 1.4), uniform(-0.1, 0.1),
               torch.rand(n, 4, generator=generator).argsort(dim=1), bernoulli(0.2), bernoulli(0.5), uniform(0.1, 2.0)]
    now = photometric_params(n, 32, generator=torch.Generator().manual_seed(11))
    for field, value in zip(PhotometricParams._fields, earlier):
        assert torch.equal(getattr(now, field), value), field
