"""--resnet_init: timm's ResNets started as torchvision's (MoCo's code and its CIFAR-10 demo) or as timm's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from hnmix.backbones import apply_resnet_init, create_backbone, resnet_init_problem
from hnmix.errors import ConfigError
from hnmix.train.components import build_model, check_arch
from hnmix.train.config import parse_config


def norm_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


@pytest.mark.parametrize("arch, torchvision_arch", [("resnet18", "resnet18"), ("resnet50", "resnet50")])
def test_torchvision_init_starts_every_batchnorm_as_torchvision_does(arch, torchvision_arch):
    assert (norm_weights(getattr(torchvision.models, torchvision_arch)()) == 1).all()
    timm_init = create_backbone(arch)
    assert (norm_weights(timm_init) == 0).any()  # timm's zero_init_last
    torch.manual_seed(0)
    plain = create_backbone(arch)
    torch.manual_seed(0)
    started = apply_resnet_init(create_backbone(arch), "torchvision", arch=arch)
    assert (norm_weights(started) == 1).all()
    for (name, value), (_, reference) in zip(started.state_dict().items(), plain.state_dict().items()):
        if not (name.endswith(".weight") and ("bn2" in name or "bn3" in name)):
            assert torch.equal(value, reference), name  # nothing else moved, no random draw consumed


def test_the_trainer_builds_both_encoders_with_the_recipes_init():
    config = parse_config(["--arch", "resnet18", "--stem", "cifar", "--head", "linear", "--img_size", "32",
                           "--resnet_init", "torchvision", "--k_moco", "64", "--batch_size", "8"])
    moco = build_model(config.model, config.method, (0, 0), seed=config.run.seed)
    assert (norm_weights(moco.encoder_q) == 1).all() and (norm_weights(moco.encoder_k) == 1).all()
    default_config = parse_config(["--arch", "resnet18", "--k_moco", "64", "--batch_size", "8"])
    default = build_model(default_config.model, default_config.method, (0, 0), seed=default_config.run.seed)
    assert (norm_weights(default.encoder_q) == 0).any()


def test_a_model_that_is_not_a_timm_resnet_is_refused_in_one_line_before_compute():
    line = resnet_init_problem("convnext_atto", "torchvision")
    assert line == ("--resnet_init torchvision needs a timm ResNet, and convnext_atto is a ConvNeXt; "
                    "use --resnet_init timm")
    with pytest.raises(ConfigError, match="needs a timm ResNet") as caught:
        check_arch("convnext_atto", "default", "torchvision")
    assert "\n" not in str(caught.value)
    assert resnet_init_problem("convnext_atto", "timm") is None and resnet_init_problem("resnet50", "torchvision") is None
