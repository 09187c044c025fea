"""The query backbone in timm's Hugging Face layout.

`export_encoder` writes `config.json` and `model.safetensors` with `timm.models.save_for_hf`, so
`timm.create_model("local-dir:DIR", pretrained=True)` (or `hf-hub:user/name` once pushed) gives
the trained backbone, classifier-free (`num_classes=0`): a feature extractor. An encoder with
the CIFAR stem (`--stem cifar`) is the exception: timm cannot rebuild that stem from config.json,
and `hnmix.load_encoder(DIR or user/name)` (`hnmix.hub.load`), which loads every export, does.

An export replaces the weights, so it deletes what `python -m hnmix.evaluate` wrote about the
old ones in that folder (`evaluation_*.json`, `lincls/`). `readable_like_siblings` gives the
safetensors files the mode other new files get (safetensors 0.8 writes 0600); the trainer's
checkpoints use it too.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from timm.models import save_for_hf

from hnmix.backbones import stem_of
from hnmix.data.augmentation import IMAGENET_MEAN, IMAGENET_STD
from hnmix.data.transforms import EVAL_CROP_PCT


# What timm's pretrained_cfg says about the ImageNet weights it ships (their tag, paper, origin,
# licence, download location): none of it is true of an encoder hnmix trained.
TIMM_WEIGHT_METADATA = ("url", "hf_hub_id", "hf_hub_filename", "tag", "license", "origin_url", "paper_ids",
                        "paper_name", "notes", "description", "test_input_size", "test_crop_pct", "file")
HNMIX_PAPER = "arXiv:2010.01028"  # MoCHi (Kalantidis et al., NeurIPS 2020)
# config.json's section of what timm cannot rebuild by itself, which timm ignores: {"stem": "default" | "cifar"}
# (`hnmix.backbones`); `hnmix.load_encoder` reads it.
HNMIX_SECTION = "hnmix"


def encoder_pretrained_cfg(backbone: nn.Module, *, img_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                           std: Sequence[float] = IMAGENET_STD, crop_pct: float = EVAL_CROP_PCT) -> dict:
    """The `pretrained_cfg` of an exported encoder: timm's architecture fields kept, its weights'
    metadata replaced by hnmix's, and the preprocessing hnmix evaluates with (resize to
    img_size / crop_pct, centre crop img_size, bilinear, the `mean` and `std` it was trained
    with: `timm.data.resolve_data_config` hands them to whoever uses the encoder). `crop_pct` is
    the run's --eval_crop_pct (0.875: ImageNet's 256 then 224; 1: no crop, as MoCo's CIFAR-10 demo)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    cfg = {k: v for k, v in dict(backbone.pretrained_cfg).items() if k not in TIMM_WEIGHT_METADATA}
    if tuple(cfg.get("input_size", ())[1:]) != (img_size, img_size) or stem_of(backbone) != "default":
        cfg.pop("pool_size", None)  # the feature map of another input size or stem
    return cfg | {"tag": "hnmix", "paper_ids": HNMIX_PAPER, "input_size": (3, img_size, img_size),
                  "crop_pct": float(crop_pct), "crop_mode": "center", "mean": tuple(mean), "std": tuple(std),
                  "interpolation": "bilinear", "num_classes": 0}


def export_encoder(backbone: nn.Module, directory: str | Path, *, img_size: int,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   crop_pct: float = EVAL_CROP_PCT) -> Path:
    """Save `backbone` (a timm model) to `directory`; returns the directory.

    config.json carries `encoder_pretrained_cfg` (not timm's claims about its own ImageNet
    weights), with the normalisation `mean` and `std` the encoder was trained with and the
    evaluation crop `crop_pct` (the run's --eval_crop_pct), which `python -m hnmix.evaluate` and
    timm's `resolve_data_config` read. It is set on a copy of the backbone, so `save_for_hf`'s plain signature works with
    every timm the requirements allow. A channels_last backbone is saved contiguous (safetensors
    stores contiguous tensors only). config.json's `hnmix` section records the stem
    (`hnmix.backbones.stem_of`): a CIFAR-stem encoder loads with `hnmix.load_encoder`, as stock
    timm cannot rebuild that stem.
    """
    directory = Path(directory)
    clear_evaluations(directory)
    exported = copy.copy(backbone)  # shallow: the same parameters, its own pretrained_cfg attribute
    if any(not p.is_contiguous() for p in backbone.parameters()):
        exported = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    exported.pretrained_cfg = encoder_pretrained_cfg(backbone, img_size=img_size, mean=mean, std=std,
                                                       crop_pct=crop_pct)
    save_for_hf(exported, str(directory), model_config={HNMIX_SECTION: {"stem": stem_of(backbone)}},
                safe_serialization=True)
    readable_like_siblings(directory)
    return directory


# What `python -m hnmix.evaluate DIR` writes into an encoder folder: results about its weights.
EVALUATION_RESULTS = ("evaluation_*.json",)
LINCLS_FOLDER = "lincls"


def clear_evaluations(directory: Path) -> None:
    """Delete the evaluation results (`evaluation_*.json`) and the linear classifier (`lincls/`)
    that `python -m hnmix.evaluate` left in the encoder folder `directory`: they describe weights
    an export is about to replace. Called before the new weights are written, so an interrupted
    export never leaves old results beside new weights."""
    if not directory.is_dir():
        return
    for pattern in EVALUATION_RESULTS:
        for stale in directory.glob(pattern):
            stale.unlink(missing_ok=True)
    shutil.rmtree(directory / LINCLS_FOLDER, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def readable_like_siblings(path: str | Path) -> None:
    """Give `path`, or each `*.safetensors` file directly inside the directory `path`, the mode
    `open()` gives a new file: 0o666 & ~umask (0644 under the usual umask 022). safetensors 0.8
    writes its files 0600, so without this the weights are the one file of an encoder or a
    checkpoint that the group cannot read."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    mode = 0o666 & ~current_umask()
    for file in files:
        if file.is_file():
            os.chmod(file, mode)
