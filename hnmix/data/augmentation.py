"""The augmentation of the two training views as one set of values: `AugmentationSpec`.

One spec drives the three places the augmentation runs, so that they agree: the crops and flips in
the workers (`hnmix.data.geometric`), the photometric half per image (`hnmix.data.transforms`) or
batched (`hnmix.data.photometric`). Its fields are the trainer's options of the same names; the
normalisation also goes into the evaluation and the exported encoder's `pretrained_cfg`.
`MOCO_V2` (the defaults) is Chen et al. 2020's recipe; `MOCO_CIFAR10_DEMO` that of MoCo's CIFAR-10
demo (facebookresearch/moco, branch colab-notebook): crop scale 0.08-1, no blur, CIFAR-10 statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hnmix.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# MoCo's CIFAR-10 demo's statistics (the widespread std, not the per-pixel std of the training set).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}

# The options of `AugmentationSpec` whose value is several numbers: how many, and an example.
NUMBER_OPTIONS: dict[str, tuple[int, str]] = {"crop_scale": (2, "0.08,1"), "jitter": (4, "0.4,0.4,0.4,0.1"),
                                              "blur_sigma": (2, "0.1,2")}
PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p")
# How --help names the value of the options that are not one number.
OPTION_METAVAR = {"crop_scale": "MIN,MAX", "jitter": "B,C,S,H", "blur_sigma": "MIN,MAX", "normalize": "NAME|M,M,M,S,S,S"}

# What each option means, for the trainer's --help and hnmix.preview's.
OPTION_HELP: dict[str, str] = {
    "crop_scale": "RandomResizedCrop's range of the crop's area fraction, MIN,MAX (YAML: a list or the same text); "
                  "MoCo v2: 0.2,1; torchvision's default and MoCo's CIFAR-10 demo: 0.08,1.",
    "flip_p": "Probability of a horizontal flip of each view.",
    "jitter": "ColorJitter strengths BRIGHTNESS,CONTRAST,SATURATION,HUE (factors drawn in [1-s, 1+s], the hue "
              "shift in [-h, h] with h <= 0.5; 0 turns one off).",
    "jitter_p": "Probability that a view is colour-jittered.",
    "grayscale_p": "Probability that a view is made grayscale.",
    "blur_p": "Probability of a Gaussian blur of a view (kernel about 10% of img_size; 0: no blur at all, as "
              "MoCo's CIFAR-10 demo).",
    "blur_sigma": "Range MIN,MAX of the blur's sigma, in pixels.",
    "normalize": "Normalisation of the views, of the kNN monitor's images and of the exported encoder's "
                 "pretrained_cfg: imagenet, cifar10 (mean 0.4914,0.4822,0.4465, std 0.2023,0.1994,0.2010, as "
                 "MoCo's CIFAR-10 demo) or six numbers MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B.",
}


def parse_numbers(name: str, value: Any) -> tuple[float, ...]:
    """The number option `name` (NUMBER_OPTIONS) as floats, from text "0.08,1" or a YAML list."""
    count, example = NUMBER_OPTIONS[name]
    numbers = _numbers(value)
    if numbers is None or len(numbers) != count:
        raise ConfigError(f"option {name} must be {count} numbers, e.g. {example} (in YAML also "
                          f"[{example.replace(',', ', ')}]), got {value!r}")
    return numbers


def parse_normalize(value: Any) -> str:
    """`normalize` in one spelling, a name of NORMALIZATIONS or six numbers "m,m,m,s,s,s", so that a
    resumed run compares equal values as equal."""
    if isinstance(value, str) and value.strip().lower() in NORMALIZATIONS:
        return value.strip().lower()
    numbers = _numbers(value)
    if numbers is None or len(numbers) != 6:
        raise ConfigError(f"option normalize must be {', '.join(NORMALIZATIONS)} or six numbers MEAN_R,MEAN_G,MEAN_B,"
                          f"STD_R,STD_G,STD_B (e.g. 0.5,0.5,0.5,0.25,0.25,0.25), got {value!r}")
    return ",".join(repr(number) for number in numbers)


def normalization(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std), three floats each, of a `normalize` value (see `parse_normalize`)."""
    canonical = parse_normalize(normalize)
    if canonical in NORMALIZATIONS:
        return NORMALIZATIONS[canonical]
    numbers = tuple(float(text) for text in canonical.split(","))
    return numbers[:3], numbers[3:]


def _numbers(value: Any) -> tuple[float, ...] | None:
    """Finite floats from "a,b,..." or a list/tuple of numbers (not booleans); None otherwise."""
    if isinstance(value, str):
        try:
            numbers = tuple(float(part) for part in value.split(","))
        except ValueError:
            return None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        numbers = tuple(float(v) for v in value)
    else:
        return None
    return numbers if all(math.isfinite(number) for number in numbers) else None


@dataclass(frozen=True)
class AugmentationSpec:
    """The values of the two views' augmentation (defaults: MoCo v2's), each as OPTION_HELP says.
    Lists (from YAML) become tuples."""

    crop_scale: tuple[float, ...] = (0.2, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, ...] = (0.1, 2.0)
    normalize: str = "imagenet"

    def __post_init__(self) -> None:
        for name in NUMBER_OPTIONS:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @property
    def mean(self) -> tuple[float, ...]:
        return normalization(self.normalize)[0]

    @property
    def std(self) -> tuple[float, ...]:
        return normalization(self.normalize)[1]

    def jitter_ranges(self) -> tuple[tuple[float, float], ...]:
        """The ranges ColorJitter draws from for these strengths, as torchvision computes them:
        (max(0, 1 - s), 1 + s) for brightness, contrast and saturation, (-h, h) for the hue."""
        brightness, contrast, saturation, hue = self.jitter
        return (*((max(0.0, 1.0 - s), 1.0 + s) for s in (brightness, contrast, saturation)), (-hue, hue))

    def check(self) -> None:
        """A ConfigError naming the option for a value the transforms cannot take."""
        for name in NUMBER_OPTIONS:
            parse_numbers(name, getattr(self, name))
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"option crop_scale must be MIN,MAX with 0 < MIN <= MAX <= 1, got {low:g},{high:g}")
        for name in PROBABILITIES:
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"option {name} is a probability: it must be in [0, 1], got {getattr(self, name)}")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ConfigError(f"option jitter must be four strengths >= 0, the hue's at most 0.5, got "
                              f"{','.join(f'{s:g}' for s in self.jitter)}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ConfigError(f"option blur_sigma must be MIN,MAX with 0 < MIN <= MAX, got {low:g},{high:g}")
        mean, std = normalization(self.normalize)
        if min(std) <= 0:
            raise ConfigError(f"option normalize: the three std values must be > 0, got {','.join(f'{s:g}' for s in std)}")

    def describe(self) -> str:
        """One line for logs and pictures, e.g. "crop 0.2-1, flip 0.5, jitter 0.4,0.4,0.4,0.1 p 0.8,
        grayscale 0.2, blur 0.5 sigma 0.1-2, imagenet normalisation"."""
        def numbers(values: tuple[float, ...], sep: str = ",") -> str:
            return sep.join(f"{v:g}" for v in values)

        blur = f"blur {self.blur_p:g} sigma {numbers(self.blur_sigma, '-')}" if self.blur_p else "no blur"
        return (f"crop {numbers(self.crop_scale, '-')}, flip {self.flip_p:g}, jitter {numbers(self.jitter)} p "
                f"{self.jitter_p:g}, grayscale {self.grayscale_p:g}, {blur}, {self.normalize} normalisation")


MOCO_V2 = AugmentationSpec()
MOCO_CIFAR10_DEMO = AugmentationSpec(crop_scale=(0.08, 1.0), blur_p=0.0, normalize="cifar10")
AUGMENTATION_OPTIONS: tuple[str, ...] = tuple(AugmentationSpec.__dataclass_fields__)


def augmentation_from(options: dict[str, Any]) -> AugmentationSpec:
    """The checked spec of a mapping of option values (a run's config.yaml, flags), MOCO_V2's
    where a value is missing or None."""
    values: dict[str, Any] = {}
    for name in AUGMENTATION_OPTIONS:
        value = options.get(name)
        if value is None:
            continue
        if name in NUMBER_OPTIONS:
            value = parse_numbers(name, value)
        elif name == "normalize":
            value = parse_normalize(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option {name} must be a number, got {value!r}")
        values[name] = float(value) if name in PROBABILITIES else value
    spec = AugmentationSpec(**values)
    spec.check()
    return spec
