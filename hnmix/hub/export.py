"""The query backbone in timm's Hugging Face layout.

`export_encoder` writes `config.json` and `model.safetensors` with `timm.models.save_for_hf`, so
`timm.create_model("local-dir:DIR", pretrained=True)` (or `hf-hub:user/name` once pushed) gives
the trained backbone, classifier-free (`num_classes=0`): a feature extractor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from timm.models import save_for_hf

from hnmix.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def export_encoder(backbone: nn.Module, directory: str | Path, *, img_size: int) -> Path:
    """Save `backbone` (a timm model) to `directory`; returns the directory.

    The preprocessing recorded in config.json is the one hnmix evaluates with: resize to
    img_size * 256/224, centre crop img_size, ImageNet mean and std. A channels_last backbone is
    saved from a contiguous copy (safetensors stores contiguous tensors only).
    """
    directory = Path(directory)
    if any(not p.is_contiguous() for p in backbone.parameters()):
        backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    data_config = {"input_size": (3, img_size, img_size), "crop_pct": 224 / 256,
                   "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    save_for_hf(backbone, str(directory), safe_serialization=True, data_config=data_config)
    return directory
