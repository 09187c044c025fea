"""Classifiers on frozen features, pure tensor math: the weighted kNN of InstDisc (Wu et al. 2018) and
the MoCo CIFAR demo (`knn_scores`, `knn_accuracy`), and a fast linear probe (`train_linear_probe`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

LINEAR_LRS = (1e-3, 1e-2)
LINEAR_WEIGHT_DECAYS = (0.0, 1e-3, 1e-2)


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

    Cosine similarities in float32; each query's k most similar bank entries (k clipped to N) vote
    for their class with weight exp(sim / temperature) (which overflows below temperature ~0.0115).
    Queries go `chunk_size` at a time ([chunk_size, N] similarities held), the same scores bit for bit.
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
    """{"knn_top1", "knn_top5"} (top-min(5, C)) in percent of the M queries; see `knn_scores` for the inputs."""
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


def _standardiser(fitted_on: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension z-score with the statistics of `fitted_on` [N, D] (a constant dimension becomes 0)."""
    fitted_on = fitted_on.float()
    mean, std = fitted_on.mean(0), fitted_on.std(0, unbiased=False).clamp_min(1e-6)  # [D], [D]
    return lambda features: (features.float().to(mean.device) - mean) / std


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

    features [N, D] float32 (standardised), labels [N] int64 -> (weights [G, D, C], biases [G, C]).
    Each minimises mean cross entropy + weight_decay / 2 * ||W||^2 (not the bias) with Adam (betas
    0.9, 0.999, eps 1e-8) from zero, lr on a cosine decay to 0 over all steps, mini-batches in an
    order drawn from `seed`. The G classifiers share each batch's [B, D] x [D, G*C] product and the
    gradient is written out (no autograd), so a grid costs about as much as its largest product.
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
    """Linear probe on frozen, precomputed features [N*, D] (labels [N*] int64), standardised with the
    statistics of the split the classifier is fitted on. Every (lr, weight decay) is fitted on train
    and scored on val by top-1; the first best wins, and with `refit_on_train_and_val` is fitted
    again on train + val before the test (without it, as when test *is* val, tested as it is).

    Returns {"linear_top1", "linear_top5" (test, top-min(5, C)), "linear_best_lr",
    "linear_best_weight_decay", "linear_val_top1" (the winner's), "linear_grid" (a list of
    {"lr", "weight_decay", "val_top1"})}.
    """
    if not lrs or not weight_decays or epochs < 1 or batch_size < 1:
        raise ValueError(f"need lrs, weight_decays, epochs >= 1 and batch_size >= 1; got {lrs}, {weight_decays}, "
                         f"{epochs}, {batch_size}")
    settings = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    fit = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, seed=seed)
    standardise = _standardiser(train_features)
    weights, biases = fit_softmax_classifiers(standardise(train_features), train_labels, settings=settings, **fit)
    val_scores = _classifier_scores(standardise(val_features), weights, biases)  # [G, M, C]
    val_top1 = [top_k_accuracy(scores, val_labels)[0] for scores in val_scores]
    best = int(np.argmax(val_top1))  # the first of equal maxima
    best_lr, best_wd = settings[best]
    if refit_on_train_and_val:
        train_features = torch.cat([train_features.float(), val_features.float().to(train_features.device)])
        train_labels = torch.cat([train_labels.long(), val_labels.long().to(train_labels.device)])
        standardise = _standardiser(train_features)
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
