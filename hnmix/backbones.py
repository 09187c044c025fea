"""The timm backbone of an encoder, with the stem the run asks for (`--stem`).

`create_backbone(arch, stem=...)` is `timm.create_model(arch, num_classes=0)` (pooled features,
[B, 3, H, W] -> [B, D]) with its stem replaced where `stem` says so:

- `default`: timm's own stem.
- `cifar`: the small-image stem of MoCo's CIFAR-10 demo (and of the usual CIFAR ResNets):
  `conv1` becomes a 3x3 convolution with stride 1, padding 1 and no bias, and the max-pool goes
  (`maxpool` -> `nn.Identity`). A 32x32 image then enters the first stage as 32x32, and leaves
  ResNet-18 as a 4x4 map instead of 1x1.

Only timm's ResNet family (`timm.models.resnet.ResNet`: resnet18, resnet50, wide_resnet50_2,
resnext, seresnet, ...) has the stem this replaces, and only its stems of one convolution and a
max-pool: a deep stem (`resnet18d`, `resnet26t`, timm's `test_resnet`: `conv1` is a stack of
convolutions) or another pool (`resnetblur18`) has no one CIFAR form, so it is refused, as is
every other model, with one line (`stem_problem` builds the model on the meta device, before any
compute).

timm cannot rebuild the cifar stem from an exported `config.json` (its stem options all have
stride 2): the export records `stem_of(backbone)` and `hnmix.load_encoder` rebuilds it with
`apply_stem`.
"""

from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn

from hnmix.errors import ConfigError

STEMS = ("default", "cifar")


def create_backbone(arch: str, *, stem: str = "default", pretrained: bool = False, **timm_kwargs) -> nn.Module:
    """timm's `arch` without classifier (num_classes=0: [B, 3, H, W] -> [B, D]) with `stem` applied.

    With `pretrained` and the cifar stem, every layer but the new stem convolution holds timm's
    weights. An `arch` that cannot take `stem` raises a one-line ConfigError (`stem_problem`'s)."""
    model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **timm_kwargs)
    return apply_stem(model, stem, arch=arch)


def _cifar_stem_refusal(model: nn.Module) -> Optional[str]:
    """Why the timm model `model` cannot take the cifar stem, or None: it must be a timm ResNet
    whose conv1 is one nn.Conv2d and whose maxpool is an nn.MaxPool2d."""
    if not isinstance(model, timm.models.resnet.ResNet):
        return f"{type(model).__name__} has no ResNet stem (conv1 + max-pool) to replace"
    if not isinstance(model.conv1, nn.Conv2d):
        return "its stem is deep: conv1 is a stack of convolutions"
    if not isinstance(model.maxpool, nn.MaxPool2d):
        return f"its stem pools with {type(model.maxpool).__name__}, not one max-pool"
    return None


def _refusal_line(arch: str, why: str) -> str:
    return (f"{arch} cannot take the CIFAR stem ({why}); choose a timm ResNet whose stem is one convolution and a "
            "max-pool (resnet18, resnet50, wide_resnet50_2, ...) or --stem default")


def apply_stem(model: nn.Module, stem: str, *, arch: Optional[str] = None) -> nn.Module:
    """Give the timm model `model` the stem `stem`, in place; returns it. `default` changes nothing.

    cifar: conv1 -> Conv2d(in_chans, width, 3, stride 1, padding 1, bias=False), initialised as timm
    initialises ResNet convolutions (Kaiming normal, fan_out); maxpool -> nn.Identity. bn1 keeps
    its width, so every later layer and its state-dict key stay as they were. A model that cannot
    take it raises a one-line ConfigError naming `arch` (default: the model's class)."""
    if stem not in STEMS:
        raise ConfigError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if stem == "default":
        return model
    why = _cifar_stem_refusal(model)
    if why:
        raise ConfigError(_refusal_line(arch or type(model).__name__, why))
    old = model.conv1
    conv = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                     device=old.weight.device, dtype=old.weight.dtype)
    if conv.weight.device.type != "meta":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = nn.Identity()
    return model


def stem_of(model: nn.Module) -> str:
    """The stem the timm model `model` has: "cifar" (a ResNet whose conv1 is 3x3 with stride 1 and
    whose max-pool is gone), else "default"."""
    conv1 = getattr(model, "conv1", None)
    if (isinstance(model, timm.models.resnet.ResNet) and isinstance(conv1, nn.Conv2d)
            and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)):
        return "cifar"
    return "default"


def stem_problem(arch: str, stem: str) -> Optional[str]:
    """The one line refusing `stem` for the timm model `arch`, or None when it can take it: the
    check before any compute. The model is built on the meta device (no memory, no weights:
    milliseconds). Every model takes the default stem; `hf-hub:` and `local-dir:` names are left to
    the build itself, which refuses them the same way."""
    if stem == "default" or ":" in arch:
        return None
    try:
        with torch.device("meta"):
            create_backbone(arch, stem=stem)
    except ConfigError as error:
        return str(error)
    return None


RESNET_INITS = ("timm", "torchvision")


def apply_resnet_init(model: nn.Module, init: str, *, arch: str) -> nn.Module:
    """`--resnet_init`, in place on a freshly built timm model; returns it. `timm` changes nothing:
    each residual block's last BatchNorm starts at weight 0 (timm's `zero_init_last`).
    `torchvision` sets those weights to 1, as torchvision's ResNets start (`zero_init_residual`
    off), and with them MoCo's own code and its CIFAR-10 demo; every other weight is initialised
    alike by both (Kaiming normal fan_out convolutions, BatchNorm 1 and 0). A model that is not a
    timm ResNet raises a one-line ConfigError."""
    if init not in RESNET_INITS:
        raise ConfigError(f"unknown resnet_init {init!r}; choose one of {', '.join(RESNET_INITS)}")
    if init == "timm":
        return model
    if not isinstance(model, timm.models.resnet.ResNet):
        raise ConfigError(f"--resnet_init torchvision needs a timm ResNet, and {arch} is a {type(model).__name__}; "
                          "use --resnet_init timm")
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, timm.models.resnet.Bottleneck):
                block.bn3.weight.fill_(1.0)
            elif isinstance(block, timm.models.resnet.BasicBlock):
                block.bn2.weight.fill_(1.0)
    return model


def resnet_init_problem(arch: str, init: str) -> Optional[str]:
    """The one line refusing `--resnet_init init` for `arch`, or None; built on the meta device,
    as `stem_problem`."""
    if init == "timm" or ":" in arch:
        return None
    try:
        with torch.device("meta"):
            apply_resnet_init(timm.create_model(arch, num_classes=0), init, arch=arch)
    except ConfigError as error:
        return str(error)
    return None
