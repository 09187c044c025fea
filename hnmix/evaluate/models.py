"""What `python -m hnmix.evaluate MODEL` evaluates: a checkpoint, an exported encoder, a Hub model or
a timm baseline, as a backbone without classifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Optional

import timm
import torch.nn as nn
import yaml

from hnmix.backbones import apply_stem
from hnmix.data.augmentation import IMAGENET_MEAN, IMAGENET_STD, normalization
from hnmix.data.transforms import EVAL_CROP_PCT
from hnmix.errors import ConfigError, HubError, describe, network_error_types
from hnmix.hub.load import _HUB_ID, load_encoder
from hnmix.moco import MoCoEncoder
from hnmix.run_config import load_run_config

CHECKPOINT_PREFIX = "encoder_q.backbone."  # the query backbone's keys in a trainer checkpoint
ENCODER_PREFIX = "encoder_q."  # the query encoder's (backbone and projection head)


@dataclass
class LoadedModel:
    """A backbone to evaluate (a timm model with num_classes=0: [B, 3, S, S] -> [B, D]) and where it came from."""

    backbone: nn.Module
    kind: str  # "checkpoint", "encoder", "hub" or "timm"
    source: str
    arch: str
    img_size: Optional[int]  # what it was trained / configured for, when known
    train_config: dict[str, Any] = field(default_factory=dict)  # the training run's options, when known
    train_config_source: Optional[str] = None  # the file they were read from
    # The crop it was evaluated with, when known: the run's --eval_crop_pct, else the pretrained_cfg's.
    crop_pct: Optional[float] = None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "arch": self.arch,
                "num_features": getattr(self.backbone, "num_features", None),
                "run_config": self.train_config_source}

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the images the backbone expects: its run's --normalize (a checkpoint's from
        before the option: ImageNet's), else its pretrained_cfg's, else ImageNet's."""
        normalize = self.train_config.get("normalize")
        if normalize is None and self.kind == "checkpoint":
            normalize = "imagenet"
        if normalize is not None:
            return normalization(normalize)
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and std is not None and len(mean) == len(std) == 3:
            return tuple(float(m) for m in mean), tuple(float(s) for s in std)
        return IMAGENET_MEAN, IMAGENET_STD


def load_backbone(model: str, *, pretrained: bool = False) -> LoadedModel:
    """`model` -> LoadedModel without classifier; user-fixable problems are one-line ConfigError/HubError.

    `model`: a checkpoint directory (model.safetensors + config.yaml), an exported encoder folder
    (`hnmix.load_encoder`, with the run's options from `run_config_of_encoder`), `hf-hub:owner/name`
    or `owner/name` where no such local path can be meant (`is_local_path`), or a timm model name
    (random weights, or timm's own with `pretrained`).
    """
    if model.startswith("hf-hub:"):
        return _load_from_hub(model.removeprefix("hf-hub:"))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
            return _load_checkpoint(path)
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            backbone = load_encoder(path, num_classes=0)
            arch = _arch_of(backbone)
            config, config_source = run_config_of_encoder(path, arch)
            img_size = config.get("img_size")
            img_size = img_size if isinstance(img_size, int) and not isinstance(img_size, bool) else _input_size(backbone)
            crop_pct = _valid_crop_pct(config.get("eval_crop_pct")) or _crop_pct(backbone)
            return LoadedModel(backbone, "encoder", str(path), arch, img_size, config, config_source, crop_pct)
        hints = [str(path / name) for name in ("encoder", "checkpoints") if (path / name).is_dir()]
        hint = f" (found {', '.join(hints)})" if hints else ""
        raise ConfigError(f"{model} is neither a checkpoint directory (model.safetensors + config.yaml) nor an "
                          f"exported encoder (config.json + model.safetensors){hint}; pass "
                          "DIR_OUT/checkpoints/step_N or DIR_OUT/encoder")
    if path.exists():
        raise ConfigError(f"model {model} is a file; pass its directory (a checkpoint or an exported encoder)")
    if is_local_path(model):
        hub = f", or hf-hub:{model} for the Hub model" if _HUB_ID.fullmatch(model) else ""
        raise ConfigError(f"model path {model} does not exist{_nearest_folder(path)}; pass a checkpoint directory "
                          f"or an exported encoder folder{hub}")
    if timm.is_model(model):
        backbone = _create(model, pretrained=pretrained,
                           what=f"timm's pretrained weights of {model}" if pretrained else f"the timm model {model}")
        return LoadedModel(backbone, "timm", model + (" (timm pretrained)" if pretrained else " (random init)"),
                           model, _input_size(backbone) if pretrained else None,
                           crop_pct=_crop_pct(backbone) if pretrained else None)
    if _HUB_ID.fullmatch(model):
        return _load_from_hub(model, local_missing=True)
    if "/" in model:
        raise ConfigError(f"model path {model} does not exist; pass a checkpoint directory, an exported encoder "
                          "folder, a Hub id (owner/name) or a timm model name")
    close = get_close_matches(model, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
    raise ConfigError(f"unknown model {model!r}: not a directory, a Hub id or a timm model name; {hint}")


def is_local_path(model: str) -> bool:
    """Whether `model` can only mean a local path (a missing one is then an error at once, not ~30 s of
    Hub retries): `.`, `/` or `~` first, a backslash, more than one `/`, or a local first folder."""
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        return True
    return "/" in model and Path(model.split("/", 1)[0]).is_dir()


def _nearest_folder(path: Path) -> str:
    """' (FOLDER exists)': the deepest existing folder above the missing `path`, to show where it went wrong."""
    for parent in path.parents:
        if str(parent) not in (".", "/", "") and parent.is_dir():
            return f" ({parent} exists)"
    return ""


def _load_from_hub(repo_id: str, *, local_missing: bool = False) -> LoadedModel:
    also = "; no local directory of that name exists either" if local_missing else ""
    try:
        backbone = load_encoder(f"hf-hub:{repo_id}", num_classes=0)
    except HubError as error:
        raise HubError(f"{error}{also}") from None
    return LoadedModel(backbone, "hub", f"hf-hub:{repo_id}", _arch_of(backbone), _input_size(backbone),
                       crop_pct=_crop_pct(backbone))


def _create(name: str, *, pretrained: bool, what: str) -> nn.Module:
    """timm.create_model(name, num_classes=0) with download and file failures as one line."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except network_error_types() as error:
        if name.startswith("local-dir:"):
            raise ConfigError(f"cannot load {what} ({describe(error)}); export it again with hnmix") from None
        raise HubError(f"cannot load {what} from the Hugging Face Hub ({describe(error)}); check the "
                       "name and the network, or pass a local checkpoint or encoder directory") from None
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot build {what} ({describe(error)}); pass a timm-compatible model") from None


def _load_checkpoint(path: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = load_run_config(path / "config.yaml") or {}
        weights = load_file(path / "model.safetensors")
    except (OSError, yaml.YAMLError, SafetensorError) as error:
        raise ConfigError(f"cannot read the checkpoint {path} ({describe(error)}); pass a complete checkpoint") from None
    arch = config.get("arch") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise ConfigError(f"{path / 'config.yaml'} names no arch; pass a checkpoint written by hnmix.train")
    backbone_weights = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in weights.items() if k.startswith(CHECKPOINT_PREFIX)}
    if not backbone_weights:
        raise ConfigError(f"{path / 'model.safetensors'} holds no {CHECKPOINT_PREFIX}* weights; "
                          "pass a checkpoint written by hnmix.train")
    backbone = _create(arch, pretrained=False, what=f"the architecture {arch!r} of {path}")
    apply_stem(backbone, config.get("stem", "default"), arch=arch)  # no stem: saved before --stem, the arch's own
    try:
        backbone.load_state_dict(backbone_weights)
    except RuntimeError as error:
        raise ConfigError(f"the weights in {path} do not fit {arch} ({describe(error)}); "
                          "pass a checkpoint written by hnmix.train") from None
    img_size = config.get("img_size")
    crop_pct = _valid_crop_pct(config.get("eval_crop_pct", EVAL_CROP_PCT))
    return LoadedModel(backbone, "checkpoint", str(path), arch, img_size if isinstance(img_size, int) else None,
                       config, str(path / "config.yaml"), crop_pct)


def projection_network(model: LoadedModel) -> nn.Module:
    """The query encoder of the trainer checkpoint `model` (`MoCoEncoder`: [B, 3, S, S] -> L2-normalised
    projection [B, dim_moco] float32), what `--knn_features projection` compares. Only a checkpoint
    holds the head; any other model is a one-line ConfigError."""
    if model.kind != "checkpoint":
        raise ConfigError(f"--knn_features projection needs the projection head, which only a trainer checkpoint "
                          f"holds, not {model.source} ({model.kind}); pass DIR_OUT/checkpoints/step_N, or "
                          "--knn_features backbone")
    from safetensors.torch import load_file

    config, path = model.train_config, Path(model.source)
    weights = {k.removeprefix(ENCODER_PREFIX): v for k, v in load_file(path / "model.safetensors").items()
               if k.startswith(ENCODER_PREFIX)}
    try:  # a checkpoint from before --head has the MLP head, as its trainer built
        encoder = MoCoEncoder(model.arch, int(config.get("dim_moco", 128)), stem=config.get("stem", "default"),
                              head=config.get("head", "mlp"))
        encoder.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"the projection head in {path} does not fit its config.yaml ({describe(error)}); "
                          "pass a checkpoint written by hnmix.train, or --knn_features backbone") from None
    return encoder


def run_config_of_encoder(path: Path, arch: str) -> tuple[dict[str, Any], Optional[str]]:
    """The training options of the run that exported the encoder folder `path`, and where they came from:
    DIR_OUT/config.yaml beside it when it names this encoder's `arch` (a `.tag` ignored) and a
    `dataset`; else what the model card `path / "README.md"` gives (`_card_config`); else ({}, None).
    """
    config_path = path.parent / "config.yaml"
    try:
        config = load_run_config(config_path) if config_path.is_file() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        config = None
    if (isinstance(config, dict) and isinstance(config.get("dataset"), str)
            and str(config.get("arch", "")).split(".")[0] == arch.split(".")[0]):
        return config, str(config_path)
    card = _card_config(path / "README.md")
    return (card, str(path / "README.md")) if card else ({}, None)


_CARD_DATASET = re.compile(r"^\| dataset \| \[?`([^`]+)`[^|]*?(?:, split `([^`]+)`)? \|", re.MULTILINE)
_CARD_IMAGE_SIZE = re.compile(r"^\| image size \| (\d+) x \d+ \|", re.MULTILINE)


def _card_config(card_path: Path) -> dict[str, Any]:
    """{dataset, split, img_size} as far as the model card written by `hnmix.hub.card` gives them
    (not the seed or synthetic_size, which take hnmix's defaults)."""
    try:
        text = card_path.read_text() if card_path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return {}
    config: dict[str, Any] = {}
    if dataset := _CARD_DATASET.search(text):
        config["dataset"] = dataset.group(1)
        if dataset.group(2):
            config["split"] = dataset.group(2)
    if size := _CARD_IMAGE_SIZE.search(text):
        config["img_size"] = int(size.group(1))
    return config


def _arch_of(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(backbone).__name__)


def _input_size(backbone: nn.Module) -> Optional[int]:
    size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None


def _crop_pct(backbone: nn.Module) -> Optional[float]:
    """The pretrained_cfg's crop_pct (an export's: its run's --eval_crop_pct), when one in (0, 1]."""
    return _valid_crop_pct((getattr(backbone, "pretrained_cfg", None) or {}).get("crop_pct"))


def _valid_crop_pct(value: Any) -> Optional[float]:
    """`value` as a crop_pct when it is a number in (0, 1], else None (a file's value is a hint, not an order)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        return None
    return float(value)
