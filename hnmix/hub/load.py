"""`hnmix.load_encoder`: an encoder exported by hnmix, as a timm model, whatever its stem.

An export (`hnmix.hub.export`) is timm's Hugging Face layout: `config.json` + `model.safetensors`.
A plain one loads with stock timm, `timm.create_model("hf-hub:user/name", pretrained=True)` (or
`local-dir:DIR`). One trained with `--stem cifar` does not: timm's ResNet stem options all have
stride 2, so timm rebuilds a 7x7 stride-2 conv1 and a max-pool, and the weights do not fit.
config.json's `hnmix` section (which timm ignores) records the stem; `load_encoder` reads it,
builds the architecture with timm, gives it that stem (`hnmix.backbones.apply_stem`) and loads the
weights. It loads every export, plain or not; a config.json without the section (an export from
before it, or any timm model) means the architecture's own stem, which timm loads as it always does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from hnmix.backbones import STEMS, apply_stem
from hnmix.errors import ConfigError, HubError, describe, network_error_types
from hnmix.hub.export import HNMIX_SECTION

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def load_encoder(path_or_hub_id: str | Path, **timm_kwargs: Any) -> nn.Module:
    """The exported encoder at `path_or_hub_id` as a timm model (num_classes=0: [B, 3, H, W] ->
    [B, num_features]) with the stem it was trained with; in training mode, as
    timm.create_model returns it (call `.eval()` for features).

    path_or_hub_id: an encoder folder (DIR_OUT/encoder, `local-dir:DIR` too), or a Hub id
    (`user/name` or `hf-hub:user/name`; downloaded with huggingface_hub into its cache).
    timm_kwargs: passed to timm.create_model (e.g. num_classes=0 for a timm model that has a
    classifier). Its `pretrained_cfg` holds the preprocessing
    (`timm.data.resolve_model_data_config(model)`). What a user can get wrong (a missing folder,
    no export there, the Hub) is a one-line ConfigError or HubError.
    """
    source = str(path_or_hub_id)
    if source.startswith("hf-hub:"):
        return _load_from_hub(source.removeprefix("hf-hub:"), timm_kwargs)
    folder = Path(source.removeprefix("local-dir:")).expanduser()
    if folder.is_dir() or source.startswith("local-dir:") or not _HUB_ID.fullmatch(source):
        return _load_folder(folder, timm_kwargs)
    return _load_from_hub(source, timm_kwargs)


def encoder_stem(config: Any) -> str:
    """The stem an export's config.json (parsed) records; "default" when it records none."""
    section = config.get(HNMIX_SECTION) if isinstance(config, dict) else None
    return section.get("stem", "default") if isinstance(section, dict) else "default"


def _load_folder(folder: Path, timm_kwargs: dict[str, Any]) -> nn.Module:
    """The encoder in `folder` (config.json + model.safetensors)."""
    if not folder.is_dir():
        raise ConfigError(f"encoder folder {folder} does not exist; pass DIR_OUT/encoder of a run, or a Hub id "
                          "user/name")
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder} holds no {CONFIG_FILE}: it is no exported encoder; pass DIR_OUT/encoder of a run")
    stem = _stem_of_config(folder / CONFIG_FILE)
    try:
        if stem == "default":  # exactly what stock timm gives
            return timm.create_model(f"local-dir:{folder}", pretrained=True, **timm_kwargs)
        return _build_with_stem(f"local-dir:{folder}", stem, folder / WEIGHTS_FILE, timm_kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise ConfigError(f"cannot load the encoder in {folder} ({describe(error)}); export it again with "
                          "hnmix") from None


def _load_from_hub(repo_id: str, timm_kwargs: dict[str, Any]) -> nn.Module:
    """The encoder in the Hub repository `repo_id`: timm's `hf-hub:` for the default stem."""
    from huggingface_hub import hf_hub_download

    try:
        stem = _stem_of_config(Path(hf_hub_download(repo_id, CONFIG_FILE)))
        if stem == "default":
            return timm.create_model(f"hf-hub:{repo_id}", pretrained=True, **timm_kwargs)
        weights = Path(hf_hub_download(repo_id, WEIGHTS_FILE))
    except (*network_error_types(), ValueError) as error:  # ValueError: huggingface_hub's invalid repo id
        raise HubError(f"cannot load the Hub model {repo_id} from the Hugging Face Hub ({describe(error)}); "
                       "check the name and the network, or pass a local encoder folder") from None
    try:
        return _build_with_stem(f"local-dir:{weights.parent}", stem, weights, timm_kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise ConfigError(f"cannot load the Hub model {repo_id} ({describe(error)}); export it again with hnmix") from None


def _stem_of_config(path: Path) -> str:
    """The stem the config.json at `path` records (`encoder_stem`), checked against STEMS."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {path} ({describe(error)}); export the encoder again") from None
    stem = encoder_stem(config)
    if stem not in STEMS:
        raise ConfigError(f"{path} records the stem {stem!r}, which this hnmix does not know ({', '.join(STEMS)}); "
                          "upgrade hnmix")
    return stem


def _build_with_stem(name: str, stem: str, weights: Path, timm_kwargs: dict[str, Any]) -> nn.Module:
    """timm's model `name` (`local-dir:DIR`: the architecture and pretrained_cfg of DIR/config.json)
    with `stem`, and the weights of the safetensors file `weights`, loaded strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = apply_stem(timm.create_model(name, pretrained=False, **timm_kwargs), stem)
    try:
        state = load_file(weights)
    except SafetensorError as error:
        raise OSError(describe(error)) from None
    model.load_state_dict(state)
    return model
