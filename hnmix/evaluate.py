"""Frozen-feature evaluation: a weighted kNN monitor and a linear probe, also as `python -m hnmix.evaluate`.

Pieces, each usable alone:

- `knn_scores`, `knn_accuracy`: the weighted kNN classifier of InstDisc (Wu et al. 2018) and the
  MoCo CIFAR demo, on features. Pure tensor math.
- `train_linear_probe`: a softmax classifier on frozen, precomputed, standardised features, with
  its learning rate and weight decay chosen on a validation split.
- `extract_features`: a backbone run over a DataLoader prepared by Accelerate, gathered across
  processes so that every sample counts once, in dataset order.
- `load_eval_splits`, `EvalImages`, `make_eval_loader`: the labelled images to evaluate on.
- `KnnMonitor`: what the trainer calls every N steps.
- `main`: the command line, for a checkpoint, an exported encoder, a Hub model or a timm baseline.

Protocol, in short: the kNN bank is the train split and its queries the held-out split (the
dataset's `validation` split, else a fixed stratified part of the train split). The linear probe
trains on the train split, picks lr and weight decay on the held-out split, and reports on `test`
(when there is no test split the held-out split doubles as test, which flatters the number; the
JSON says which split played which role).

Logging goes through the standard `logging` module; results on several processes are computed on
the main process and broadcast, so every rank returns the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import datasets
import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from hnmix.augment import eval_transform
from hnmix.data import TwoViewDataset, load_image_dataset, resolve_columns, to_rgb
from hnmix.errors import ConfigError, DataError, HnmixError, HubError, describe, network_error_types

logger = logging.getLogger("hnmix.evaluate")  # not __name__: that is "__main__" under python -m

CHECKPOINT_PREFIX = "encoder_q.backbone."  # the query backbone's keys in a trainer checkpoint
DEFAULT_DATASET = "ilee0022/Caltech-256"
DEFAULT_SEED = 69420  # hnmix.config's default: the same synthetic images and held-out split as training
LINEAR_LRS = (1e-3, 1e-2)
LINEAR_WEIGHT_DECAYS = (0.0, 1e-3, 1e-2)
NO_LABELS = ("kNN/linear evaluation needs a label column; pass --label_column, or --eval_every 0 to train "
             "without the kNN monitor")


# ----------------------------------------------------------------------------- kNN


def knn_scores(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores: [N, D] bank, [N] int64 labels, [M, D] queries -> [M, C] float32.

    Both feature sets are L2-normalised here and compared by cosine similarity in float32. Each
    query takes its k most similar bank entries (k is clipped to N); entry j votes for its class
    with weight exp(sim_j / temperature); a class's score is the sum of its votes (zero when none
    of the k neighbours has it). Queries are processed `chunk_size` at a time (rounded up to a
    multiple of 64), so the similarities held at once are [chunk_size, N]; the scores are the same,
    bit for bit, whatever the chunk size.

    Note: exp(1 / temperature) overflows float32 below temperature ~0.0115.
    """
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(bank_features.shape)} "
                         f"and {tuple(query_features.shape)}")
    if bank_labels.shape != bank_features.shape[:1]:
        raise ValueError(f"bank_labels must be [N={bank_features.shape[0]}], got {tuple(bank_labels.shape)}")
    if bank_features.shape[0] == 0 or k < 1 or temperature <= 0 or chunk_size < 1 or num_classes < 1:
        raise ValueError(f"need a non-empty bank, k >= 1, temperature > 0, chunk_size >= 1 and num_classes >= 1; "
                         f"got N={bank_features.shape[0]}, k={k}, temperature={temperature}, "
                         f"chunk_size={chunk_size}, num_classes={num_classes}")
    bank_labels = bank_labels.long().to(bank_features.device)
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes}), got {bank_labels.min()}..{bank_labels.max()}")
    bank = F.normalize(bank_features.float(), dim=1)  # [N, D]
    k = min(k, bank.shape[0])
    num_queries = query_features.shape[0]
    chunk_size = math.ceil(chunk_size / _QUERY_BLOCK) * _QUERY_BLOCK
    scores = torch.zeros(num_queries, num_classes, device=bank.device)
    for start in range(0, num_queries, chunk_size):
        queries = F.normalize(query_features[start : start + chunk_size].float().to(bank.device), dim=1)  # [m, D]
        similarity = _block_similarity(queries, bank)  # [m, N]
        top_similarity, top_index = similarity.topk(k, dim=1)  # [m, k]
        weights = (top_similarity / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, bank_labels[top_index], weights)
    return scores


# Query similarities are computed 64 queries at a time, zero-padded, always the same shape: BLAS
# chooses its kernel (and so the float32 summation order) by shape, and a query's scores would
# otherwise change in the last bits with chunk_size. chunk_size is rounded up to a multiple of it.
_QUERY_BLOCK = 64


def _block_similarity(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[m, D] @ [N, D].T -> [m, N], as products of [_QUERY_BLOCK, D] blocks."""
    padding = -queries.shape[0] % _QUERY_BLOCK
    padded = F.pad(queries, (0, 0, 0, padding))
    return torch.cat([block @ bank.T for block in padded.split(_QUERY_BLOCK)])[: queries.shape[0]]


def knn_accuracy(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """{"knn_top1", "knn_top5"} in percent of the M queries; see `knn_scores` for the inputs.

    A query is right at top-5 when its label is among the min(5, C) best-scored classes.
    """
    scores = knn_scores(bank_features, bank_labels, query_features, num_classes=num_classes, k=k,
                        temperature=temperature, chunk_size=chunk_size)
    top1, top5 = top_k_accuracy(scores, query_labels)
    return {"knn_top1": top1, "knn_top5": top5}


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """scores [M, C], labels [M] -> (top-1 %, top-min(5, C) %)."""
    if scores.shape[0] == 0:
        raise ValueError("no queries to score")
    labels = labels.long().to(scores.device)
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices  # [M, 5]
    hits = ranked == labels[:, None]
    count = len(labels)
    return 100.0 * hits[:, 0].sum().item() / count, 100.0 * hits.any(1).sum().item() / count


# ----------------------------------------------------------------------------- linear probe


@dataclass
class _Standardiser:
    """Per-dimension z-score with statistics of the features the classifier is fitted on."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D], at least 1e-6 (a constant dimension becomes 0)

    @classmethod
    def fit(cls, features: torch.Tensor) -> "_Standardiser":
        features = features.float()
        return cls(features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float().to(self.mean.device) - self.mean) / self.std


def fit_softmax_classifiers(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    settings: Sequence[tuple[float, float]],
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one softmax classifier per (lr, weight_decay) in `settings`, all in the same pass.

    features [N, D] float32 (already standardised), labels [N] int64 -> (weights [G, D, C],
    biases [G, C]) for the G settings. Each minimises mean cross entropy + weight_decay / 2 *
    ||W||^2 (an L2 penalty on the weights, not the bias) with Adam (betas 0.9, 0.999, eps 1e-8)
    from zero, lr on a cosine decay to 0 over epochs * ceil(N / batch_size) steps, mini-batches in
    an order drawn from `seed` (the last one of an epoch may be smaller). The G classifiers share
    each batch: one [B, D] x [D, G*C] product, and the gradient is written out (no autograd), so a
    grid costs about as much as its largest matrix product. Deterministic for given inputs and
    device.
    """
    n, dim = features.shape
    groups = len(settings)
    device = features.device
    lr = torch.tensor([s[0] for s in settings], dtype=torch.float32, device=device).view(1, groups, 1)
    weight_decay = torch.tensor([s[1] for s in settings], dtype=torch.float32, device=device).view(1, groups, 1)
    weights = torch.zeros(dim, groups, num_classes, device=device)
    biases = torch.zeros(groups, num_classes, device=device)
    moments = [torch.zeros_like(t) for t in (weights, weights, biases, biases)]  # m_w, v_w, m_b, v_b
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    total_steps = epochs * math.ceil(n / batch_size)
    generator = torch.Generator().manual_seed(seed)
    labels = labels.long().to(device)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            x, y = features[batch], labels[batch]  # [B, D], [B]
            rows = torch.arange(len(batch), device=device)
            logits = (x @ weights.view(dim, -1)).view(-1, groups, num_classes) + biases  # [B, G, C]
            grad_logits = logits.softmax(-1)
            grad_logits[rows, :, y] -= 1.0
            grad_logits /= len(batch)
            grad_w = (x.T @ grad_logits.view(len(batch), -1)).view(dim, groups, num_classes) + weight_decay * weights
            grad_b = grad_logits.sum(0)
            step += 1
            step_lr = lr * (0.5 * (1.0 + math.cos(math.pi * (step - 1) / total_steps)))
            for param, grad, m, v in ((weights, grad_w, *moments[:2]), (biases, grad_b, *moments[2:])):
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
                param.sub_((step_lr if param is weights else step_lr.view(groups, 1)) * update)
    return weights.permute(1, 0, 2).contiguous(), biases


def _classifier_scores(features: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor,
                       chunk_size: int = 4096) -> torch.Tensor:
    """[M, D] standardised features, [G, D, C] weights, [G, C] biases -> [G, M, C] logits."""
    groups, dim, num_classes = weights.shape
    flat = weights.permute(1, 0, 2).reshape(dim, groups * num_classes)
    parts = [(chunk @ flat).view(-1, groups, num_classes) + biases for chunk in features.split(chunk_size)]
    return torch.cat(parts).permute(1, 0, 2)


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    lrs: Sequence[float] = LINEAR_LRS,
    weight_decays: Sequence[float] = LINEAR_WEIGHT_DECAYS,
    epochs: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    refit_on_train_and_val: bool = True,
) -> dict[str, Any]:
    """Linear probe on frozen, precomputed features; returns accuracies in percent.

    train/val/test features [N*, D] (any float dtype), labels [N*] int64. Features are
    standardised per dimension with the statistics of the split the classifier is fitted on.
    Every (lr, weight decay) of the grid is fitted on train (`fit_softmax_classifiers`, seeded)
    and scored on val by top-1; the best wins (ties: the first in grid order, lrs outer). With
    `refit_on_train_and_val` the winner is fitted again, same seed, on train + val before the
    test; without it (use this when test *is* val) the winner fitted on train is tested.

    Returns {"linear_top1", "linear_top5" (test, top-min(5, C)), "linear_best_lr",
    "linear_best_weight_decay", "linear_val_top1" (the winner's), "linear_grid" (a list of
    {"lr", "weight_decay", "val_top1"})}.
    """
    if not lrs or not weight_decays or epochs < 1 or batch_size < 1:
        raise ValueError(f"need lrs, weight_decays, epochs >= 1 and batch_size >= 1; got {lrs}, {weight_decays}, "
                         f"{epochs}, {batch_size}")
    settings = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    fit = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, seed=seed)
    standardise = _Standardiser.fit(train_features)
    weights, biases = fit_softmax_classifiers(standardise(train_features), train_labels, settings=settings, **fit)
    val_scores = _classifier_scores(standardise(val_features), weights, biases)  # [G, M, C]
    val_top1 = [top_k_accuracy(scores, val_labels)[0] for scores in val_scores]
    best = int(np.argmax(val_top1))  # the first of equal maxima
    best_lr, best_wd = settings[best]
    if refit_on_train_and_val:
        train_features = torch.cat([train_features.float(), val_features.float().to(train_features.device)])
        train_labels = torch.cat([train_labels.long(), val_labels.long().to(train_labels.device)])
        standardise = _Standardiser.fit(train_features)
        weights, biases = fit_softmax_classifiers(standardise(train_features), train_labels,
                                                  settings=[settings[best]], **fit)
    else:
        weights, biases = weights[best : best + 1], biases[best : best + 1]
    test_top1, test_top5 = top_k_accuracy(_classifier_scores(standardise(test_features), weights, biases)[0],
                                          test_labels)
    return {
        "linear_top1": test_top1,
        "linear_top5": test_top5,
        "linear_best_lr": best_lr,
        "linear_best_weight_decay": best_wd,
        "linear_val_top1": val_top1[best],
        "linear_grid": [{"lr": lr, "weight_decay": wd, "val_top1": acc} for (lr, wd), acc in zip(settings, val_top1)],
    }


# ----------------------------------------------------------------------------- features


@contextmanager
def main_process_buffers(module: nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """Within the block every rank holds the main process's buffers (BatchNorm running statistics);
    afterwards each rank has its own back.

    The trainer runs DDP without buffer broadcasts, so ranks drift apart; checkpoints and the
    exported encoder carry the main process's, and so does an evaluation.
    """
    buffers = [b for b in module.buffers() if b.numel()]
    if accelerator.num_processes == 1 or not buffers or not dist.is_initialized():
        yield
        return
    own = [b.detach().clone() for b in buffers]
    for buffer in buffers:
        dist.broadcast(buffer.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, own):
                buffer.copy_(saved)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `backbone` over `loader` -> (features [N, D] float32, labels [N] int64) on every rank.

    `loader` yields (images [B, 3, H, W], labels [B]) and must be prepared by `accelerator`
    (`accelerator.prepare(loader)`): each process then sees a shard, and
    `accelerator.gather_for_metrics` puts the shards back together in dataset order, dropping the
    samples Accelerate repeats to even out the last batch, so each of the N samples counts once.
    The backbone runs in eval mode, without gradients, under `accelerator.autocast()`, with the
    main process's buffers (`main_process_buffers`); its training mode and buffers are restored
    afterwards. Results stay on `accelerator.device`.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        with main_process_buffers(backbone, accelerator):
            for images, batch_labels in loader:
                with accelerator.autocast():
                    batch_features = backbone(images.to(accelerator.device))
                batch_features = batch_features.float().flatten(1)
                batch_labels = batch_labels.to(accelerator.device).long()
                batch_features, batch_labels = accelerator.gather_for_metrics((batch_features, batch_labels))
                features.append(batch_features)
                labels.append(batch_labels)
    finally:
        backbone.train(was_training)
    if not features:
        raise DataError("the evaluation loader yielded no batches; pass a split that holds images")
    return torch.cat(features), torch.cat(labels)


# ----------------------------------------------------------------------------- data


@dataclass
class EvalSplits:
    """Labelled splits to evaluate on, each already bounded by `max_samples`.

    train: the kNN bank and the linear classifier's training split.
    held_out: the kNN queries and the linear probe's validation split.
    test: the linear probe's test split; None when the dataset has none (held_out doubles as test).
    The *_source fields say where each came from, for reports.
    """

    train: datasets.Dataset
    held_out: datasets.Dataset
    test: Optional[datasets.Dataset]
    image_column: str
    label_column: str
    num_classes: int
    train_source: str
    held_out_source: str
    test_source: Optional[str]

    def sizes(self, *, with_test: bool = True) -> dict[str, int]:
        sizes = {"train": len(self.train), "held_out": len(self.held_out)}
        if with_test:
            sizes["test"] = len(self.test) if self.test is not None else len(self.held_out)
        return sizes

    def describe(self, *, with_test: bool = True) -> dict[str, Any]:
        """Where each split came from, its size, the columns and the class count (JSON-ready)."""
        roles = {"train": self.train_source, "held_out": self.held_out_source}
        if with_test:
            roles["test"] = self.test_source or "none: the held-out split doubles as test"
        return roles | {"sizes": self.sizes(with_test=with_test), "image_column": self.image_column,
                        "label_column": self.label_column, "num_classes": self.num_classes}


_MISSING_SPLIT = re.compile(r"^split '[^']*' does not exist|has no rows;")


def _optional_split(source: str, split: str, label_column: str, **load: Any) -> Optional[datasets.Dataset]:
    """`load_image_dataset(source, split=split)`, or None when that split is missing, empty or unlabelled.

    hnmix.data reports a missing split as a DataError that begins "split 'NAME' does not exist";
    any other DataError (network, unreadable files) is raised. A split without `label_column`, or
    whose labels are all missing or negative (Hub test splits often carry -1), counts as missing.
    """
    try:
        dataset = load_image_dataset(source, split=split, **load)
    except DataError as error:
        if _MISSING_SPLIT.search(str(error)):
            logger.info("dataset %s has no usable %s split", source, split)
            return None
        raise
    if label_column not in dataset.column_names:
        logger.info("dataset %s: split %s has no %r column; not used", source, split, label_column)
        return None
    values = dataset.select_columns([label_column]).with_format("arrow")[:][label_column]
    if values.null_count == len(values) or not any(v is not None and v >= 0 for v in values.to_pylist()):
        logger.info("dataset %s: split %s is unlabelled (all labels missing or negative); not used", source, split)
        return None
    return dataset


def _labels(dataset: datasets.Dataset, column: str, name: str) -> np.ndarray:
    """The label column as [N] int64; a missing or negative label is a DataError."""
    values = dataset.select_columns([column]).with_format("arrow")[:][column]
    if values.null_count:
        raise DataError(f"{values.null_count} rows of the {name} split have no {column!r} label; "
                        "pass a dataset whose evaluation splits are fully labelled, or turn evaluation off")
    labels = np.asarray(values, dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"the {name} split has negative labels in column {column!r}; "
                        "pass --label_column NAME of a column of class ids 0..C-1")
    return labels


def _check_split_size(eval_split_size: Union[int, float]) -> None:
    if isinstance(eval_split_size, bool) or not (
        (isinstance(eval_split_size, int) and eval_split_size >= 1)
        or (isinstance(eval_split_size, float) and 0.0 < eval_split_size < 1.0)
    ):
        raise ConfigError(f"eval_split_size must be a fraction in (0, 1) or a count >= 1, got {eval_split_size!r}; "
                          "pass e.g. --eval_split_size 0.1")


def stratified_holdout(
    dataset: datasets.Dataset, label_column: str, size: Union[int, float], *, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, held_out): a fixed, seeded, stratified part of `dataset` (`size`: fraction or count).

    The split is `datasets.Dataset.train_test_split(test_size=size, stratify_by_column=...,
    seed=seed)`, run on an in-memory table of the labels alone (as a ClassLabel with the ids
    unchanged), then applied with `select`: the same split as on the full dataset, without
    rewriting its images or needing its label column to be a ClassLabel already.
    """
    _check_split_size(size)
    labels = _labels(dataset, label_column, "train")
    table = datasets.Dataset.from_dict(
        {"label": labels, "row": np.arange(len(labels))},
        features=datasets.Features({"label": datasets.ClassLabel(num_classes=int(labels.max()) + 1),
                                    "row": datasets.Value("int64")}),
    )
    try:
        parts = table.train_test_split(test_size=size, stratify_by_column="label", seed=seed, keep_in_memory=True)
    except ValueError as error:
        raise DataError(f"cannot hold out a stratified eval split of size {size} from {len(labels)} rows "
                        f"({str(error).splitlines()[0]}); pass another --eval_split_size, or a dataset "
                        "with a validation split") from None
    rest, held_out = (sorted(parts[name]["row"]) for name in ("train", "test"))
    return (dataset.select(rest, keep_in_memory=True), dataset.select(held_out, keep_in_memory=True))


def bounded_subset(dataset: datasets.Dataset, max_samples: Optional[int], *, seed: int, salt: int = 0) -> datasets.Dataset:
    """At most `max_samples` rows: a seeded uniform draw without replacement, kept in dataset order."""
    if max_samples is None or len(dataset) <= max_samples:
        return dataset
    rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(salt,)))
    return dataset.select(np.sort(rng.choice(len(dataset), max_samples, replace=False)), keep_in_memory=True)


def load_eval_splits(
    source: str,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: Optional[str] = None,
    eval_split_size: Union[int, float] = 0.1,
    max_samples: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    cache_dir: Optional[str] = None,
    synthetic_size: int = 512,
    with_test: bool = False,
) -> EvalSplits:
    """The labelled splits of `--dataset` (any form `hnmix.data.load_image_dataset` takes).

    - train: split `split`.
    - held_out: the dataset's `validation` split when it exists (and is not `split`), else
      `stratified_holdout(train, eval_split_size, seed)`, which train then loses.
    - test (with_test): the `test` split when it exists (and is not `split`), else None.
    A validation or test split without labels (all missing or negative) counts as missing.
    Each is then cut to `max_samples` rows (`bounded_subset`, seeded). Labels come from
    `label_column` (resolved as in training); a dataset without one is a DataError, as are
    some-but-not-all missing labels and a label outside a ClassLabel's classes. num_classes is
    the ClassLabel's count, else the largest label of any split + 1.
    """
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"eval_max_samples must be >= 1, got {max_samples}; pass a positive count or leave it out")
    _check_split_size(eval_split_size)
    load = dict(cache_dir=cache_dir, seed=seed, synthetic_size=synthetic_size)
    train = load_image_dataset(source, split=split, **load)
    image_column, label_column = resolve_columns(train, image_column, label_column)
    if label_column is None:
        raise DataError(NO_LABELS)
    train_source = f"{source} split {split}"
    validation = _optional_split(source, "validation", label_column, **load) if split != "validation" else None
    if validation is not None:
        held_out, held_out_source = validation, f"{source} split validation"
    else:
        train, held_out = stratified_holdout(train, label_column, eval_split_size, seed=seed)
        held_out_source = f"{source} split {split}: stratified held-out part of size {eval_split_size}, seed {seed}"
        train_source += " without its held-out part"
    test, test_source = None, None
    if with_test and split != "test":
        test = _optional_split(source, "test", label_column, **load)
        test_source = f"{source} split test" if test is not None else None

    feature = train.features[label_column]
    named = {"train": train, "held_out": held_out} | ({"test": test} if test is not None else {})
    for name, dataset in named.items():
        resolve_columns(dataset, image_column, label_column)
    labels = {name: _labels(dataset, label_column, name) for name, dataset in named.items()}
    if isinstance(feature, datasets.ClassLabel):
        num_classes = feature.num_classes
        for name, values in labels.items():
            if values.max() >= num_classes:
                raise DataError(f"the {name} split has label {values.max()} but column {label_column!r} of the train "
                                f"split has classes 0..{num_classes - 1}; pass a dataset whose splits share their classes")
    else:
        num_classes = max(int(values.max()) for values in labels.values()) + 1
    train, held_out = (bounded_subset(d, max_samples, seed=seed, salt=i) for i, d in enumerate((train, held_out)))
    test = bounded_subset(test, max_samples, seed=seed, salt=2) if test is not None else None
    splits = EvalSplits(train, held_out, test, image_column, label_column, num_classes,
                        train_source, held_out_source, test_source)
    logger.info("evaluation splits: %s (%d classes)", splits.sizes(with_test=with_test), num_classes)
    return splits


class EvalImages(TwoViewDataset):
    """Row i of a labelled `datasets.Dataset` -> (image [3, S, S] float32, label int).

    The image is read and checked like a training sample (`TwoViewDataset`'s reading, with its
    one-line error for an undecodable image), made RGB by `hnmix.data.to_rgb` and cropped by the
    deterministic `hnmix.augment.eval_transform(img_size)`.
    """

    def __init__(self, dataset: datasets.Dataset, *, image_column: str, label_column: str, img_size: int):
        transform = eval_transform(img_size)
        super().__init__(dataset, image_column=image_column, label_column=label_column, transform=transform, seed=0)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self._read_row(int(index))
        return self.transform(to_rgb(row[self.image_column])), int(row[self.label_column])


def make_eval_loader(images: EvalImages, *, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches (images [B, 3, S, S] float32, labels [B] int64) in dataset order, the last one
    possibly smaller. Prepare it with `accelerator.prepare` before `extract_features`.

    The loader has a generator of its own: a DataLoader without one draws its workers' base seed
    from the global RNG on every pass, and an evaluation in the middle of training would then
    change the training's later random draws.
    """
    return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- monitor


class KnnMonitor:
    """The kNN accuracy of a backbone during training: bank = train images, queries = held-out images.

    The loaders must already be prepared by the trainer's accelerator (`from_splits` builds and
    prepares them). `evaluate` extracts both feature sets (`extract_features`: every rank takes
    part), scores on the main process and broadcasts, so every rank returns the same dict.
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
        features before the projection head). Call it on every rank."""
        bank_features, bank_labels = extract_features(backbone, self.bank_loader, accelerator)
        query_features, query_labels = extract_features(backbone, self.query_loader, accelerator)
        result = None
        if accelerator.is_main_process:
            result = knn_accuracy(bank_features, bank_labels, query_features, query_labels,
                                  num_classes=self.num_classes, k=self.k, temperature=self.temperature)
        return broadcast_from_main(result, accelerator)


def broadcast_from_main(value: Any, accelerator: Accelerator) -> Any:
    """The main process's `value` (a picklable object) on every rank."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


# ----------------------------------------------------------------------------- models


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


# ----------------------------------------------------------------------------- command line


def _split_size(text: str) -> Union[int, float]:
    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor a count") from None
    return value


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.evaluate",
        description="kNN or linear-probe accuracy of a frozen encoder on a labelled dataset. "
        "Run it as `accelerate launch -m hnmix.evaluate ...` to share the feature extraction among processes.",
    )
    parser.add_argument("model", help="a checkpoint directory (DIR_OUT/checkpoints/step_N), an exported encoder "
                        "folder (DIR_OUT/encoder), a Hub id (hf-hub:owner/name or owner/name) or a timm model name")
    parser.add_argument("--protocol", choices=("knn", "linear"), default="knn", help="(default: knn)")
    parser.add_argument("--pretrained", action="store_true", help="a timm model name: use timm's pretrained weights")
    data = parser.add_argument_group("DATA (defaults: a checkpoint's training config, else the values shown)")
    data.add_argument("--dataset", help=f"Hub id, local dataset repo, image folder, save_to_disk directory, or "
                      f"`synthetic` (default: {DEFAULT_DATASET})")
    data.add_argument("--split", help="the train split: kNN bank / linear training data (default: train)")
    data.add_argument("--image_column", help="(default: image)")
    data.add_argument("--label_column", help="(default: `label` if present, else the first ClassLabel column)")
    data.add_argument("--synthetic_size", type=int, help="images per split of --dataset synthetic (default: 512)")
    data.add_argument("--dir_data", help="cache directory of `datasets`")
    data.add_argument("--seed", type=int, help=f"seed of synthetic data, the held-out split, subsets, the linear "
                      f"probe and a random-init timm model (default: {DEFAULT_SEED})")
    data.add_argument("--img_size", type=int, help="evaluation crop (default: the checkpoint's img_size, the "
                      "encoder's input_size, else 224)")
    data.add_argument("--eval_split_size", type=_split_size, default=0.1, help="held-out part of the train split "
                      "when there is no validation split: a fraction or a count (default: 0.1)")
    data.add_argument("--eval_max_samples", type=int, help="at most this many images per split, a seeded subset "
                          "(default: all)")
    data.add_argument("--batch_size", type=int, default=128, help="per process (default: 128)")
    data.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per process (default: 4)")
    data.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="(default: the accelerate config)")
    proto = parser.add_argument_group("PROTOCOLS")
    proto.add_argument("--knn_k", type=int, default=200, help="neighbours (default: 200)")
    proto.add_argument("--knn_temperature", type=float, default=0.1, help="vote weight exp(sim / T) (default: 0.1)")
    proto.add_argument("--linear_lrs", type=_float_list, default=LINEAR_LRS,
                       help=f"Adam learning rates to choose from (default: {','.join(map(str, LINEAR_LRS))})")
    proto.add_argument("--linear_weight_decays", type=_float_list, default=LINEAR_WEIGHT_DECAYS,
                       help=f"L2 penalties to choose from (default: {','.join(map(str, LINEAR_WEIGHT_DECAYS))})")
    proto.add_argument("--linear_epochs", type=int, default=10, help="(default: 10)")
    proto.add_argument("--linear_batch_size", type=int, default=256, help="(default: 256)")
    parser.add_argument("--json", help="where to write the results (default: MODEL/evaluation_PROTOCOL.json for a "
                        "checkpoint or encoder directory, no file for a Hub or timm model)")
    return parser


@dataclass
class EvalOptions:
    """The command line with the checkpoint's defaults filled in."""

    args: argparse.Namespace
    dataset: str
    split: str
    image_column: str
    label_column: Optional[str]
    synthetic_size: int
    dir_data: Optional[str]
    seed: int
    img_size: int


def resolve_options(args: argparse.Namespace, model: LoadedModel) -> EvalOptions:
    """Flags win; then a checkpoint's training config; then hnmix's defaults."""
    trained = model.train_config

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else trained.get(name, default)

    options = EvalOptions(
        args=args, dataset=pick("dataset", DEFAULT_DATASET), split=pick("split", "train"),
        image_column=pick("image_column", "image"), label_column=pick("label_column", None),
        synthetic_size=pick("synthetic_size", 512), dir_data=pick("dir_data", None), seed=pick("seed", DEFAULT_SEED),
        img_size=args.img_size or model.img_size or 224,
    )
    positive = {"img_size": options.img_size, "batch_size": args.batch_size, "knn_k": args.knn_k,
                "linear_epochs": args.linear_epochs, "linear_batch_size": args.linear_batch_size,
                "synthetic_size": options.synthetic_size}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"option {name} must be >= 1, got {value}")
    if args.num_workers < 0:
        raise ConfigError(f"option num_workers must be >= 0, got {args.num_workers}")
    if not args.knn_temperature > 0:
        raise ConfigError(f"option knn_temperature must be > 0, got {args.knn_temperature}")
    if args.protocol == "linear" and not (args.linear_lrs and args.linear_weight_decays):
        raise ConfigError("options linear_lrs and linear_weight_decays need at least one value each")
    return options


def default_json_path(args: argparse.Namespace, model: LoadedModel) -> Optional[Path]:
    if args.json:
        return Path(args.json)
    if model.kind in ("checkpoint", "encoder"):
        return Path(model.source) / f"evaluation_{args.protocol}.json"
    return None


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """The whole CLI run; returns the report (the same on every rank) after printing and writing it."""
    accelerator = _make_accelerator(args.mixed_precision)
    _configure_logging(accelerator)
    set_seed(args.seed if args.seed is not None else DEFAULT_SEED)  # a random-init baseline: the same weights on every rank
    with accelerator.main_process_first():
        model = load_backbone(args.model, pretrained=args.pretrained)
    options = resolve_options(args, model)
    json_path = default_json_path(args, model)
    if json_path is not None:
        _check_writable(json_path)  # on every rank, before the work: all ranks stop together
    with accelerator.main_process_first():
        splits = load_eval_splits(
            options.dataset, split=options.split, image_column=options.image_column,
            label_column=options.label_column, eval_split_size=args.eval_split_size,
            max_samples=args.eval_max_samples, seed=options.seed, cache_dir=options.dir_data,
            synthetic_size=options.synthetic_size, with_test=args.protocol == "linear",
        )
    backbone = model.backbone.to(accelerator.device)

    def features_of(dataset: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        images = EvalImages(dataset, image_column=splits.image_column, label_column=splits.label_column,
                            img_size=options.img_size)
        loader = accelerator.prepare(make_eval_loader(images, batch_size=args.batch_size, num_workers=args.num_workers))
        return extract_features(backbone, loader, accelerator)

    started = time.perf_counter()
    train_f, train_y = features_of(splits.train)
    held_f, held_y = features_of(splits.held_out)
    test_f, test_y = features_of(splits.test) if splits.test is not None else (held_f, held_y)
    extraction_s = time.perf_counter() - started
    settings: dict[str, Any] = {"img_size": options.img_size, "batch_size": args.batch_size,
                                "eval_split_size": args.eval_split_size, "eval_max_samples": args.eval_max_samples,
                                "seed": options.seed, "mixed_precision": accelerator.mixed_precision,
                                "num_processes": accelerator.num_processes}
    metrics = None
    if accelerator.is_main_process:
        started = time.perf_counter()
        if args.protocol == "knn":
            settings |= {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature}
            metrics = knn_accuracy(train_f, train_y, held_f, held_y, num_classes=splits.num_classes,
                                   k=args.knn_k, temperature=args.knn_temperature)
        else:
            settings |= {"linear_lrs": list(args.linear_lrs), "linear_weight_decays": list(args.linear_weight_decays),
                         "linear_epochs": args.linear_epochs, "linear_batch_size": args.linear_batch_size,
                         "linear_features": "standardised with the fitting split's mean and std",
                         "linear_refit_on_train_and_val": splits.test is not None}
            metrics = train_linear_probe(train_f, train_y, held_f, held_y, test_f, test_y,
                                         num_classes=splits.num_classes, lrs=args.linear_lrs,
                                         weight_decays=args.linear_weight_decays, epochs=args.linear_epochs,
                                         batch_size=args.linear_batch_size, seed=options.seed,
                                         refit_on_train_and_val=splits.test is not None)
        metrics |= {"seconds_features": extraction_s, "seconds_protocol": time.perf_counter() - started}
    metrics = broadcast_from_main(metrics, accelerator)
    report = {**metrics, "protocol": args.protocol, "model": model.describe(),
              "dataset": {"source": options.dataset, "split": options.split,
                          **splits.describe(with_test=args.protocol == "linear")},
              "settings": settings, "json": str(json_path) if json_path else None}
    if accelerator.is_main_process:
        if json_path is not None:
            _write_json(json_path, report)
        _print_table(report)
    accelerator.wait_for_everyone()
    return report


def _make_accelerator(mixed_precision: Optional[str]) -> Accelerator:
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except (ValueError, ImportError) as error:
        raise ConfigError(f"cannot set up Accelerate: {str(error).splitlines()[0]}") from None


def _configure_logging(accelerator: Accelerator) -> None:
    """INFO lines of hnmix on the main process's stderr (rich), errors only elsewhere."""
    from rich.console import Console
    from rich.logging import RichHandler

    hnmix_logger = logging.getLogger("hnmix")
    if accelerator.is_main_process:
        hnmix_logger.setLevel(logging.INFO)
        if not any(isinstance(h, RichHandler) for h in hnmix_logger.handlers):
            console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
            hnmix_logger.addHandler(RichHandler(console=console, show_path=False))
    else:
        hnmix_logger.setLevel(logging.ERROR)
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def _check_writable(path: Path) -> None:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write the results to {path} (not a writable file); pass --json PATH")


def _write_json(path: Path, report: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as error:
        raise ConfigError(f"cannot write the results to {path} ({error.strerror or error}); pass --json PATH") from None
    logger.info("wrote %s", path)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    dataset = report["dataset"]
    table = Table(title=f"hnmix.evaluate: {report['protocol']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model", f"{report['model']['source']} ({report['model']['arch']})")
    table.add_row("dataset", f"{dataset['source']}, {dataset['num_classes']} classes")
    for role in dataset["sizes"]:
        table.add_row(role, f"{dataset['sizes'][role]} images: {dataset[role]}")
    for name, value in report.items():
        if name.startswith(("knn_", "linear_")) and isinstance(value, float):
            table.add_row(name, f"{value:.2f}" if name.endswith(("top1", "top5")) else f"{value:g}")
    if report["json"]:
        table.add_row("json", report["json"])
    Console(soft_wrap=True).print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_evaluation(args)
    except HnmixError as error:
        if os.environ.get("RANK", "0") == "0":
            # An error raised in a DataLoader worker arrives with the worker's traceback before it.
            line = str(error).strip().splitlines()[-1]
            sys.stderr.write(f"hnmix: error: {line}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
