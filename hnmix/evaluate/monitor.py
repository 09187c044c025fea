"""The kNN monitor the trainer runs every `--eval_every` steps or epochs."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.data
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from hnmix.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from hnmix.evaluate.features import (
    EvalImages,
    ExtractedFeatures,
    extract_features,
    make_eval_loader,
    raise_if_any_rank_failed,
)
from hnmix.evaluate.probes import knn_accuracy
from hnmix.evaluate.splits import EvalSplits

# What the monitor compares: "backbone", the encoder's pooled features (before the projection
# head), or "projection", the query encoder's L2-normalised head output [B, dim_moco].
KNN_FEATURES = ("backbone", "projection")

KnnResult = dict[str, Union[float, int, str]]


class KnnMonitor:
    """The kNN accuracy of an encoder during training: bank = train images, queries = held-out images.

    The loaders are prepared by the trainer's accelerator (`from_splits` builds and prepares them).
    `split` names the queries' split for the records; `features` (KNN_FEATURES) says which network
    `network_of` picks from an encoder.
    """

    def __init__(self, bank_loader: torch.utils.data.DataLoader, query_loader: torch.utils.data.DataLoader, *,
                 num_classes: int, k: int = 200, temperature: float = 0.1, split: str = "held_out",
                 features: str = "backbone"):
        if features not in KNN_FEATURES:
            raise ValueError(f"features must be one of {', '.join(KNN_FEATURES)}, got {features!r}")
        self.bank_loader = bank_loader
        self.query_loader = query_loader
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.split = split
        self.features = features

    @classmethod
    def from_splits(cls, splits: EvalSplits, accelerator: Accelerator, *, img_size: int, batch_size: int,
                    num_workers: int, k: int = 200, temperature: float = 0.1, features: str = "backbone",
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    crop_pct: float = EVAL_CROP_PCT) -> "KnnMonitor":
        """Loaders of splits.train (bank) and splits.held_out (queries), prepared by `accelerator`, of
        images centre-cropped by `crop_pct` and normalised with the training's `mean` and `std`."""
        loaders = [
            make_eval_loader(EvalImages(dataset, image_column=splits.image_column, label_column=splits.label_column,
                                        img_size=img_size, mean=mean, std=std, crop_pct=crop_pct),
                             batch_size=batch_size, num_workers=num_workers)
            for dataset in (splits.train, splits.held_out)
        ]
        bank_loader, query_loader = accelerator.prepare(*loaders)
        return cls(bank_loader, query_loader, num_classes=splits.num_classes, k=k, temperature=temperature,
                   split=splits.held_out_name, features=features)

    def network_of(self, encoder: nn.Module) -> nn.Module:
        """What `evaluate` runs of a `hnmix.moco.MoCoEncoder`: itself (projection) or its `.backbone`."""
        return encoder if self.features == "projection" else encoder.backbone

    def evaluate(self, network: nn.Module, accelerator: Accelerator) -> KnnResult:
        """The kNN of `network`'s outputs ([B, 3, S, S] -> [B, D]), the same on every rank (call it on
        each): "knn_top1", "knn_top5" in percent; "knn_split"; "knn_bank" and "knn_queries" (the
        readable images scored); "eval_bad_samples" when some could not be read. A failure on any rank,
        in the extraction or the scoring, is raised on every rank."""
        bank = extract_features(network, self.bank_loader, accelerator)
        queries = extract_features(network, self.query_loader, accelerator)
        result, failure = None, None
        if accelerator.is_main_process:
            try:
                result = self._score(bank, queries)
            except Exception as error:  # noqa: BLE001 - made known to every rank, then raised
                failure = error
        raise_if_any_rank_failed(failure, accelerator, "kNN scoring")  # before the others wait in the broadcast
        return broadcast_from_main(result, accelerator)

    def _score(self, bank: ExtractedFeatures, queries: ExtractedFeatures) -> KnnResult:
        """The kNN result of the gathered features (the main process computes it)."""
        (bank_features, bank_labels), (query_features, query_labels) = bank, queries
        result: KnnResult = knn_accuracy(bank_features, bank_labels, query_features, query_labels,
                                         num_classes=self.num_classes, k=self.k, temperature=self.temperature)
        result |= {"knn_split": self.split, "knn_bank": len(bank_labels), "knn_queries": len(query_labels)}
        if bank.skipped + queries.skipped:
            result["eval_bad_samples"] = bank.skipped + queries.skipped
        return result


def broadcast_from_main(value: Any, accelerator: Accelerator) -> Any:
    """The main process's `value` (a picklable object) on every rank."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]
