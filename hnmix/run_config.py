"""A run's options as its config.yaml or a recipe holds them: in groups (`data: {img_size: 32}`),
as hnmix writes them, or flat (`img_size: 32`), as older runs and recipes do."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

# The groups of the training options, in the order config.yaml and --help show them.
OPTION_GROUPS = ("data", "augmentation", "model", "method", "optimization", "evaluation", "hub", "run")


def flat_options(saved: Mapping[str, Any]) -> dict[str, Any]:
    """{option: value} of a grouped or flat mapping; a flat entry wins over a group's."""
    flat: dict[str, Any] = {}
    for name, value in saved.items():
        if name in OPTION_GROUPS and isinstance(value, Mapping):
            flat = {**value, **flat}
        else:
            flat[name] = value
    return flat


def load_run_config(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The options of a config.yaml or recipe by flat name (`flat_options`); None when the file
    holds no mapping. OSError and yaml.YAMLError pass to the caller, which names the way out."""
    loaded = yaml.safe_load(Path(path).read_text())
    return flat_options(loaded) if isinstance(loaded, dict) else None
