"""hnmix.backbones (the CIFAR stem, its refusals) and MoCoEncoder's stem and heads."""

import copy

import pytest
import timm
import torch
from torch import nn

from hnmix.backbones import apply_stem, create_backbone, stem_of, stem_problem
from hnmix.errors import ConfigError
from hnmix.moco import MoCo, MoCoEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stem_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a timm ResNet's stem makes of images [B, 3, H, W]: conv1, bn1, act1, maxpool."""
    return model.maxpool(model.act1(model.bn1(model.conv1(images))))


def test_the_cifar_stem_is_a_3x3_stride_1_conv_without_bias_and_no_max_pool():
    model = create_backbone("resnet18", stem="cifar")
    conv1 = model.conv1
    assert (conv1.in_channels, conv1.out_channels) == (3, 64)
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.num_classes == 0 and stem_of(model) == "cifar"


def test_a_32x32_image_keeps_32x32_through_the_cifar_stem_and_ends_as_a_4x4_map():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    cifar, default = create_backbone("resnet18", stem="cifar").eval(), create_backbone("resnet18").eval()
    with torch.no_grad():
        assert stem_output(cifar, images).shape == (2, 64, 32, 32)
        assert stem_output(default, images).shape == (2, 64, 8, 8)  # timm's: 7x7 stride 2, then a stride-2 max-pool
        assert cifar.forward_features(images).shape == (2, 512, 4, 4)
        assert default.forward_features(images).shape == (2, 512, 1, 1)
        assert cifar(images).shape == (2, 512)
    assert stem_of(default) == "default"


def test_the_default_stem_leaves_timms_model_as_it_is():
    torch.manual_seed(0)
    ours = create_backbone("resnet18")
    torch.manual_seed(0)
    timms = timm.create_model("resnet18", num_classes=0)
    assert type(ours.conv1) is type(timms.conv1) and ours.conv1.stride == (2, 2)
    assert isinstance(ours.maxpool, nn.MaxPool2d)
    assert ours.state_dict().keys() == timms.state_dict().keys()
    for name, tensor in timms.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("arch, why", [
    ("resnet18d", "its stem is deep: conv1 is a stack of convolutions"),
    ("test_resnet", "its stem is deep"),
    ("resnetblur18", "its stem pools with Sequential"),
    ("efficientnet_b2", "EfficientNet has no ResNet stem"),
    ("test_vit", "VisionTransformer has no ResNet stem"),
])
def test_an_arch_that_cannot_take_the_cifar_stem_is_refused_in_one_line(arch, why):
    with pytest.raises(ConfigError) as error:
        create_backbone(arch, stem="cifar")
    line = str(error.value)
    assert "\n" not in line
    assert line.startswith(f"{arch} cannot take the CIFAR stem") and why in line and "stem default" in line
    assert stem_problem(arch, "cifar") == line  # the check before compute (meta device) says the same


def test_the_check_before_compute_passes_what_builds_and_skips_names_timm_resolves_elsewhere():
    assert stem_problem("resnet18", "cifar") is None
    assert stem_problem("wide_resnet50_2", "cifar") is None
    assert stem_problem("resnet18d", "default") is None  # every arch keeps its own stem
    assert stem_problem("local-dir:/nowhere", "cifar") is None  # checked when built


def test_an_unknown_stem_is_one_line():
    with pytest.raises(ConfigError, match="unknown stem 'tiny'; choose one of default, cifar"):
        apply_stem(timm.create_model("resnet18", num_classes=0), "tiny")


# ----------------------------------------------------------------------------- MoCoEncoder


def test_the_linear_head_is_one_linear_layer_and_the_mlp_head_two():
    linear = MoCoEncoder("resnet18", 128, stem="cifar", head="linear")
    assert isinstance(linear.head, nn.Linear)
    assert (linear.head.in_features, linear.head.out_features) == (512, 128) and linear.head.bias is not None
    head_keys = {k for k in linear.state_dict() if k.startswith("head.")}
    assert head_keys == {"head.weight", "head.bias"}

    mlp = MoCoEncoder("resnet18", 128)
    assert {k for k in mlp.state_dict() if k.startswith("head.")} == {
        "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    assert [type(m) for m in mlp.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (mlp.head[0].out_features, mlp.head[2].out_features) == (512, 128)


def test_the_linear_head_projects_the_pooled_features_and_normalises():
    torch.manual_seed(0)
    encoder = MoCoEncoder("resnet18", 16, stem="cifar", head="linear").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = nn.functional.normalize(encoder.head(encoder.backbone(images)), dim=1)
        torch.testing.assert_close(encoder(images), expected)
    assert encoder(images).shape == (3, 16)


def test_an_unknown_head_is_refused():
    with pytest.raises(ValueError, match="head must be one of mlp, linear"):
        MoCoEncoder("resnet18", 16, head="deep")


def test_the_key_encoder_is_a_copy_with_the_cifar_stem_and_the_linear_head():
    torch.manual_seed(0)
    moco = MoCo(MoCoEncoder("resnet18", 16, stem="cifar", head="linear"), dim_moco=16, k_moco=8, m_moco=0.9,
                t_moco=0.2)
    key = moco.encoder_k
    assert stem_of(key.backbone) == "cifar" and isinstance(key.head, nn.Linear)
    assert key.backbone.conv1 is not moco.encoder_q.backbone.conv1
    for name, tensor in moco.encoder_q.state_dict().items():
        torch.testing.assert_close(key.state_dict()[name], tensor, rtol=0, atol=0)
    # A checkpoint's keys: the stem changes conv1's shape, the head its key names.
    weights = moco.state_dict()
    assert weights["encoder_q.backbone.conv1.weight"].shape == weights["encoder_k.backbone.conv1.weight"].shape == (
        64, 3, 3, 3)
    assert "encoder_q.head.weight" in weights and "encoder_q.head.0.weight" not in weights
    with pytest.raises(RuntimeError, match="conv1.weight"):
        MoCo(MoCoEncoder("resnet18", 16, head="linear"), dim_moco=16, k_moco=8, m_moco=0.9,
             t_moco=0.2).load_state_dict(weights)
    with pytest.raises(RuntimeError, match="head"):
        MoCo(MoCoEncoder("resnet18", 16, stem="cifar"), dim_moco=16, k_moco=8, m_moco=0.9,
             t_moco=0.2).load_state_dict(weights)
    assert copy.deepcopy(moco.encoder_q).backbone.maxpool.__class__ is nn.Identity
