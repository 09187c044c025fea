"""hnmix.data.augmentation: the augmentation's values as one spec, read from text or YAML, checked."""

import pytest
from torchvision import transforms

from hnmix.data.augmentation import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOCO_CIFAR10_DEMO,
    MOCO_V2,
    AugmentationSpec,
    augmentation_from,
    parse_normalize,
    parse_numbers,
)
from hnmix.errors import ConfigError


def test_the_defaults_are_moco_v2_and_the_demo_preset_is_moco_cifar10_demo():
    """Chen et al. 2020's recipe; MoCo's CIFAR-10 demo: torchvision's crop scale, no blur, CIFAR-10 statistics."""
    assert MOCO_V2 == AugmentationSpec()
    assert (MOCO_V2.crop_scale, MOCO_V2.flip_p, MOCO_V2.jitter, MOCO_V2.jitter_p) == ((0.2, 1.0), 0.5, (0.4, 0.4, 0.4, 0.1), 0.8)
    assert (MOCO_V2.grayscale_p, MOCO_V2.blur_p, MOCO_V2.blur_sigma) == (0.2, 0.5, (0.1, 2.0))
    assert (MOCO_V2.mean, MOCO_V2.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert MOCO_CIFAR10_DEMO == AugmentationSpec(crop_scale=(0.08, 1.0), blur_p=0.0, normalize="cifar10")
    assert (MOCO_CIFAR10_DEMO.mean, MOCO_CIFAR10_DEMO.std) == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


@pytest.mark.parametrize("value", ["0.08,1", " 0.08, 1 ", [0.08, 1], (0.08, 1.0)])
def test_numbers_are_read_from_text_or_a_yaml_list(value):
    assert parse_numbers("crop_scale", value) == (0.08, 1.0)


@pytest.mark.parametrize("name, value", [("crop_scale", "0.5"), ("crop_scale", "a,b"), ("jitter", "0.4,0.4,0.4"),
                                         ("blur_sigma", [0.1, True]), ("crop_scale", 0.5), ("crop_scale", "nan,1")])
def test_a_wrong_count_or_a_non_number_is_one_line_with_an_example(name, value):
    with pytest.raises(ConfigError, match=rf"^option {name} must be \d numbers, e\.g\. [\d.,]+ \(in YAML also \[") as error:
        parse_numbers(name, value)
    assert "\n" not in str(error.value)


def test_a_normalisation_has_one_spelling_from_text_or_a_list():
    assert parse_normalize("CIFAR10") == "cifar10" and parse_normalize("imagenet") == "imagenet"
    text = parse_normalize("0.5,.5,0.5,0.25,0.25,.25")
    assert text == parse_normalize([0.5, 0.5, 0.5, 0.25, 0.25, 0.25]) == "0.5,0.5,0.5,0.25,0.25,0.25"
    spec = AugmentationSpec(normalize=text)
    assert (spec.mean, spec.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert (AugmentationSpec(normalize="cifar10").mean, AugmentationSpec(normalize="cifar10").std) == (CIFAR10_MEAN, CIFAR10_STD)
    for bad in ("imagenet21k", "1,2,3", [0.5] * 7):
        with pytest.raises(ConfigError, match="option normalize must be imagenet, cifar10 or six numbers"):
            parse_normalize(bad)


@pytest.mark.parametrize("values, message", [
    ({"crop_scale": (0.5, 0.2)}, "option crop_scale must be MIN,MAX with 0 < MIN <= MAX <= 1, got 0.5,0.2"),
    ({"crop_scale": (0.0, 1.0)}, "option crop_scale must be MIN,MAX with 0 < MIN"),
    ({"crop_scale": (0.2, 1.5)}, "option crop_scale must be MIN,MAX"),
    ({"flip_p": 1.5}, "option flip_p is a probability: it must be in [0, 1], got 1.5"),
    ({"jitter_p": -0.1}, "option jitter_p is a probability"),
    ({"grayscale_p": 2.0}, "option grayscale_p is a probability"),
    ({"blur_p": -1.0}, "option blur_p is a probability"),
    ({"jitter": (0.4, -0.1, 0.4, 0.1)}, "option jitter must be four strengths >= 0, the hue's at most 0.5"),
    ({"jitter": (0.4, 0.4, 0.4, 0.6)}, "option jitter must be four strengths >= 0, the hue's at most 0.5, got 0.4,0.4,0.4,0.6"),
    ({"blur_sigma": (2.0, 0.1)}, "option blur_sigma must be MIN,MAX with 0 < MIN <= MAX, got 2,0.1"),
    ({"blur_sigma": (0.0, 1.0)}, "option blur_sigma must be MIN,MAX with 0 < MIN"),
    ({"normalize": "0.5,0.5,0.5,0.25,0,0.25"}, "option normalize: the three std values must be > 0"),
])
def test_values_the_transforms_cannot_take_are_one_line_naming_the_option(values, message):
    with pytest.raises(ConfigError) as error:
        AugmentationSpec(**values).check()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_edges_are_allowed():
    AugmentationSpec(crop_scale=(1.0, 1.0), flip_p=0.0, jitter=(0.0, 2.0, 0.0, 0.5), jitter_p=1.0, grayscale_p=1.0,
                     blur_p=0.0, blur_sigma=(0.5, 0.5)).check()


def test_jitter_ranges_are_those_torchvisions_color_jitter_draws_from():
    """The batched half draws its factors from `jitter_ranges`, the per-image half from
    ColorJitter(*jitter): the same ranges for any strengths (a strength over 1 stops at 0)."""
    for strengths in [(0.4, 0.4, 0.4, 0.1), (0.8, 0.2, 1.5, 0.5), (0.0, 0.3, 0.0, 0.0)]:
        jitter = transforms.ColorJitter(*strengths)
        expected = [getattr(jitter, name) or (1.0, 1.0) for name in ("brightness", "contrast", "saturation")]
        expected.append(jitter.hue or (0.0, 0.0))  # torchvision keeps None for an op that is off
        assert [tuple(r) for r in AugmentationSpec(jitter=strengths).jitter_ranges()] == [tuple(r) for r in expected]


def test_augmentation_from_a_mapping_takes_moco_v2_for_what_is_missing_and_checks_the_rest():
    assert augmentation_from({}) == MOCO_V2
    assert augmentation_from({"dataset": "x", "crop_scale": [0.08, 1], "blur_p": 0, "normalize": "cifar10",
                              "jitter": None}) == MOCO_CIFAR10_DEMO
    with pytest.raises(ConfigError, match="option flip_p must be a number, got 'often'"):
        augmentation_from({"flip_p": "often"})
    with pytest.raises(ConfigError, match="option crop_scale must be MIN,MAX"):
        augmentation_from({"crop_scale": "0.9,0.1"})


def test_describe_says_every_value_in_one_line():
    assert MOCO_V2.describe() == ("crop 0.2-1, flip 0.5, jitter 0.4,0.4,0.4,0.1 p 0.8, grayscale 0.2, blur 0.5 sigma "
                                  "0.1-2, imagenet normalisation")
    assert "no blur" in MOCO_CIFAR10_DEMO.describe() and "cifar10 normalisation" in MOCO_CIFAR10_DEMO.describe()


def test_the_imagenet_statistics_stay_importable_from_transforms():
    from hnmix.data import transforms as per_image

    assert (per_image.IMAGENET_MEAN, per_image.IMAGENET_STD) == (IMAGENET_MEAN, IMAGENET_STD)
