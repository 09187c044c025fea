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

from hnmix.errors import ConfigError, HubError, describe, network_error_types

CHECKPOINT_PREFIX = "encoder_q.backbone."  # the query backbone's keys in a trainer checkpoint


@dataclass
class LoadedModel:
    """A backbone to evaluate (a timm model with num_classes=0: [B, 3, S, S] -> [B, D]) and where it came from."""

    backbone: nn.Module
    kind: str  # "checkpoint", "encoder", "hub" or "timm"
    source: str
    arch: str
    img_size: Optional[int]  # what it was trained / configured for, when known
    train_config: dict[str, Any] = field(default_factory=dict)  # a checkpoint's config.yaml

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "arch": self.arch,
                "num_features": getattr(self.backbone, "num_features", None)}


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def load_backbone(model: str, *, pretrained: bool = False) -> LoadedModel:
    """`model` -> LoadedModel; user-fixable problems are one-line ConfigError/HubError.

    - a checkpoint directory (model.safetensors with `encoder_q.backbone.*` keys + config.yaml
      naming `arch`): that architecture with those weights;
    - an exported encoder folder (config.json + model.safetensors, timm's `save_for_hf` layout):
      `timm.create_model("local-dir:PATH", pretrained=True)`;
    - `hf-hub:owner/name` or `owner/name` (when no such local path exists): timm's `hf-hub:`;
    - a timm model name: random weights, or timm's own with `pretrained`.
    The classifier is always dropped (num_classes=0).
    """
    if model.startswith("hf-hub:"):
        return _load_from_hub(model.removeprefix("hf-hub:"))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
            return _load_checkpoint(path)
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            backbone = _create(f"local-dir:{path}", pretrained=True, what=f"the encoder folder {path}")
            return LoadedModel(backbone, "encoder", str(path), _arch_of(backbone), _input_size(backbone))
        hints = [str(path / name) for name in ("encoder", "checkpoints") if (path / name).is_dir()]
        hint = f" (found {', '.join(hints)})" if hints else ""
        raise ConfigError(f"{model} is neither a checkpoint directory (model.safetensors + config.yaml) nor an "
                          f"exported encoder (config.json + model.safetensors){hint}; pass "
                          "DIR_OUT/checkpoints/step_N or DIR_OUT/encoder")
    if path.exists():
        raise ConfigError(f"model {model} is a file; pass its directory (a checkpoint or an exported encoder)")
    if timm.is_model(model):
        backbone = _create(model, pretrained=pretrained,
                           what=f"timm's pretrained weights of {model}" if pretrained else f"the timm model {model}")
        return LoadedModel(backbone, "timm", model + (" (timm pretrained)" if pretrained else " (random init)"),
                           model, _input_size(backbone) if pretrained else None)
    if _HUB_ID.fullmatch(model):
        return _load_from_hub(model, local_missing=True)
    if "/" in model or model.startswith((".", "~")):
        raise ConfigError(f"model path {model} does not exist; pass a checkpoint directory, an exported encoder "
                          "folder, a Hub id (owner/name) or a timm model name")
    close = get_close_matches(model, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
    raise ConfigError(f"unknown model {model!r}: not a directory, a Hub id or a timm model name; {hint}")


def _load_from_hub(repo_id: str, *, local_missing: bool = False) -> LoadedModel:
    also = "; no local directory of that name exists either" if local_missing else ""
    backbone = _create(f"hf-hub:{repo_id}", pretrained=True, what=f"the Hub model {repo_id}", also=also)
    return LoadedModel(backbone, "hub", f"hf-hub:{repo_id}", _arch_of(backbone), _input_size(backbone))


def _create(name: str, *, pretrained: bool, what: str, also: str = "") -> nn.Module:
    """timm.create_model(name, num_classes=0) with download and file failures as one line."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except network_error_types() as error:
        if name.startswith("local-dir:"):
            raise ConfigError(f"cannot load {what} ({describe(error)}); export it again with hnmix") from None
        raise HubError(f"cannot load {what} from the Hugging Face Hub ({describe(error)}){also}; check the "
                       "name and the network, or pass a local checkpoint or encoder directory") from None
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot build {what} ({describe(error)}); pass a timm-compatible model") from None


def _load_checkpoint(path: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
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
    try:
        backbone.load_state_dict(backbone_weights)
    except RuntimeError as error:
        raise ConfigError(f"the weights in {path} do not fit {arch} ({describe(error)}); "
                          "pass a checkpoint written by hnmix.train") from None
    img_size = config.get("img_size")
    return LoadedModel(backbone, "checkpoint", str(path), arch, img_size if isinstance(img_size, int) else None, config)


def _arch_of(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(backbone).__name__)


def _input_size(backbone: nn.Module) -> Optional[int]:
    size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None
