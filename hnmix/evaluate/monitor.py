"""The kNN monitor the trainer runs every `--eval_every` steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.utils.data
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from hnmix.evaluate.features import (
    EvalImages,
    ExtractedFeatures,
    extract_features,
    make_eval_loader,
    raise_if_any_rank_failed,
)
from hnmix.evaluate.probes import knn_accuracy
from hnmix.evaluate.splits import EvalSplits


class KnnMonitor:
    """The kNN accuracy of a backbone during training: bank = train images, queries = held-out images.

    The loaders must already be prepared by the trainer's accelerator (`from_splits` builds and
    prepares them). `evaluate` extracts both feature sets (`extract_features`: every rank takes
    part), scores on the main process and broadcasts, so every rank returns the same dict. A
    failure on any rank, in the extraction or the scoring, is raised on every rank
    (`raise_if_any_rank_failed`), so that none waits for it in a collective.
    """

    def __init__(self, bank_loader: torch.utils.data.DataLoader, query_loader: torch.utils.data.DataLoader, *,
                 num_classes: int, k: int = 200, temperature: float = 0.1):
        self.bank_loader = bank_loader
        self.query_loader = query_loader
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature

    @classmethod
    def from_splits(cls, splits: EvalSplits, accelerator: Accelerator, *, img_size: int, batch_size: int,
                    num_workers: int, k: int = 200, temperature: float = 0.1) -> "KnnMonitor":
        """Loaders of splits.train (bank) and splits.held_out (queries), prepared by `accelerator`."""
        loaders = [
            make_eval_loader(EvalImages(dataset, image_column=splits.image_column, label_column=splits.label_column,
                                        img_size=img_size), batch_size=batch_size, num_workers=num_workers)
            for dataset in (splits.train, splits.held_out)
        ]
        bank_loader, query_loader = accelerator.prepare(*loaders)
        return cls(bank_loader, query_loader, num_classes=splits.num_classes, k=k, temperature=temperature)

    def evaluate(self, backbone: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """{"knn_top1", "knn_top5"} in percent for `backbone` (e.g. `MoCoEncoder.backbone`:
        features before the projection head), and "eval_bad_samples" (images of either split that
        could not be read, left out) when there were any. Call it on every rank."""
        bank = extract_features(backbone, self.bank_loader, accelerator)
        queries = extract_features(backbone, self.query_loader, accelerator)
        result, failure = None, None
        if accelerator.is_main_process:
            try:
                result = self._score(bank, queries)
            except Exception as error:  # noqa: BLE001 - made known to every rank, then raised
                failure = error
        raise_if_any_rank_failed(failure, accelerator, "kNN scoring")  # before the others wait in the broadcast
        return broadcast_from_main(result, accelerator)

    def _score(self, bank: ExtractedFeatures, queries: ExtractedFeatures) -> dict[str, float]:
        """The kNN result of the gathered features (the main process computes it)."""
        (bank_features, bank_labels), (query_features, query_labels) = bank, queries
        result = knn_accuracy(bank_features, bank_labels, query_features, query_labels,
                              num_classes=self.num_classes, k=self.k, temperature=self.temperature)
        if bank.skipped + queries.skipped:
            result["eval_bad_samples"] = bank.skipped + queries.skipped
        return result


def broadcast_from_main(value: Any, accelerator: Accelerator) -> Any:
    """The main process's `value` (a picklable object) on every rank."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]
