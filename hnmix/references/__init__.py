"""Published results to compare runs with, as data with their sources.

Each reference is one YAML file beside this module, `NAME.yaml` (e.g. `moco_cifar10_demo.yaml`:
the kNN curve of MoCo's own CIFAR-10 demo, epoch by epoch, from the notebook's log). The files
are package data, so an installed hnmix has them too. `python -m hnmix.plot RUN_DIR --reference
NAME` overlays a reference's curve on a run's; `hnmix.bench` compares speeds with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from hnmix.errors import ConfigError

_SUFFIX = ".yaml"


@dataclass(frozen=True)
class Reference:
    """One published result.

    name: the file's stem (`--reference NAME`); title: short, for legends; source: where the
    numbers come from (repository, branch, file, url, ...); recipe: a summary of the setting;
    metric: what `knn_top1_by_epoch` measures; knn_top1_by_epoch: {epoch (1-based, as the source
    counts): kNN top-1 in percent after that epoch}; train_images: images per training epoch;
    images_per_s: the published training throughput and images_per_s_how how it was derived;
    other_results: further published numbers, one dict each (label, metric, value, source, ...).
    """

    name: str
    title: str
    source: dict[str, str]
    recipe: dict[str, Any]
    metric: str
    knn_top1_by_epoch: dict[int, float]
    train_images: int
    images_per_s: float
    images_per_s_how: str
    other_results: tuple[dict[str, Any], ...]


def known_references() -> list[str]:
    """The names `load_reference` accepts, sorted."""
    package = resources.files(__name__)
    return sorted(entry.name[: -len(_SUFFIX)] for entry in package.iterdir() if entry.name.endswith(_SUFFIX))


def load_reference(name: str) -> Reference:
    """The reference `name` (a ConfigError listing the known ones when there is none)."""
    known = known_references()
    if name not in known:
        raise ConfigError(f"unknown reference {name!r}; known: {', '.join(known) or 'none'}")
    path = resources.files(__name__) / f"{name}{_SUFFIX}"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return _reference(name, data)


def _reference(name: str, data: Any) -> Reference:
    """Check the loaded YAML of `name` and build its Reference; a malformed file is a ConfigError."""
    def fail(what: str) -> ConfigError:
        return ConfigError(f"reference {name}: {what}; fix hnmix/references/{name}{_SUFFIX}")

    if not isinstance(data, dict):
        raise fail("not a mapping")
    fields = ("title", "source", "recipe", "metric", "knn_top1_by_epoch", "train_images", "images_per_s",
              "images_per_s_how", "other_results")
    missing = [field for field in fields if field not in data]
    if missing:
        raise fail(f"missing {', '.join(missing)}")
    if data.get("name", name) != name:
        raise fail(f"its name is {data['name']!r}, not the file's")
    curve = data["knn_top1_by_epoch"]
    if not isinstance(curve, dict) or not curve:
        raise fail("knn_top1_by_epoch must map epochs to accuracies")
    for epoch, value in curve.items():
        if not (isinstance(epoch, int) and epoch >= 1 and isinstance(value, (int, float)) and math.isfinite(value)):
            raise fail(f"knn_top1_by_epoch has {epoch!r}: {value!r}; keys are epochs from 1, values percentages")
    if not isinstance(data["other_results"], list) or not all(isinstance(r, dict) for r in data["other_results"]):
        raise fail("other_results must be a list of mappings")
    return Reference(
        name=name, title=str(data["title"]), source=dict(data["source"]), recipe=dict(data["recipe"]),
        metric=str(data["metric"]), knn_top1_by_epoch={int(e): float(v) for e, v in sorted(curve.items())},
        train_images=int(data["train_images"]), images_per_s=float(data["images_per_s"]),
        images_per_s_how=str(data["images_per_s_how"]), other_results=tuple(dict(r) for r in data["other_results"]))
