"""The numbers of MoCHi's analysis of hardness (Kalantidis et al. 2020, sections 3 and 4) and Wang
and Isola's alignment and uniformity, as pure functions of logits, labels and projections, for
`python -m hnmix.analyze`. Logits are those of `hnmix.mixing.mix_logits`: divided by the
temperature, column 0 the positive, 1..K the queue, then each registered negative type's
synthetic negatives in the registry's order, -inf where masked.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hnmix.mixing import NEGATIVE_TYPES, MixedLogits


def type_columns(logits: torch.Tensor, *, queue_size: int, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """{type name: [B, count]} the columns of each registered type of logits [B, 1 + K + S], K =
    queue_size; sizes: each type's count by its `size` ({"s1": 16, "s2": 16}), as `mix_logits` took them."""
    counts = [sizes.get(t.size, 0) for t in NEGATIVE_TYPES.values()]
    return dict(zip(NEGATIVE_TYPES, logits[:, 1 + queue_size :].split(counts, dim=1)))


def logit_groups(mixed: MixedLogits, *, queue_size: int, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The logits of one batch, by kind, each a 1-D float32 tensor (divided by the temperature).

    mixed: `mix_logits` of B queries with these `sizes`; logits [B, 1 + K + S], K = queue_size.
    positive: [B] l_b0 = q_b·k_b / T.
    queue:    the finite l_bj, j = 1..K (every real negative; an entry masked as the query's own
              image is -inf and left out).
    hard:     the n_hard highest finite queue logits of each query (`hard_valid` ones).
    then each registered type by its name ("type1", "type2"): the finite l of its columns.
    """
    logits = mixed.logits.detach().float()
    queue = logits[:, 1 : 1 + queue_size]
    hard = queue.gather(1, mixed.hard_indices)[mixed.hard_valid]
    types = type_columns(logits, queue_size=queue_size, sizes=sizes)
    return {"positive": logits[:, 0], "queue": queue[torch.isfinite(queue)], "hard": hard,
            **{name: block[torch.isfinite(block)] for name, block in types.items()}}


def logit_histograms(groups: dict[str, torch.Tensor], *, bins: int = 40) -> dict[str, list]:
    """Histograms of each group on shared edges: {"edges": [bins + 1], name: [bins] counts}: `bins`
    equal bins over [min, max] of all values, the last one closed on the right (numpy's rule)."""
    values = torch.cat([g.double().flatten() for g in groups.values()])
    low, high = (values.min().item(), values.max().item()) if values.numel() else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    result: dict[str, list] = {"edges": edges.tolist()}
    for name, group in groups.items():
        index = torch.bucketize(group.double().flatten(), edges, right=True).sub_(1).clamp_(0, bins - 1)
        result[name] = torch.bincount(index, minlength=bins).tolist()
    return result


def false_negative_fraction(queue_logits: torch.Tensor, labels: torch.Tensor, queue_labels: torch.Tensor,
                            top_n: Sequence[int]) -> list[float]:
    """The fraction of false negatives (the query's own class) among each query's N hardest
    real negatives, for each N in `top_n`.

    queue_logits: [B, K] q_b·n_j (any scale; -inf where an entry may not be a negative).
    labels: [B] int64 class of each query; queue_labels: [K] int64 class of each queue entry;
    -1 is unknown.
    With T_N(b) the N highest finite queue logits of query b and "known" meaning y_b >= 0 and
    y_j >= 0:

        FN(N) = sum_b sum_{j in T_N(b), known} [y_j = y_b]  /  sum_b sum_{j in T_N(b)} [known]

    as `hnmix.moco.step_statistics`' hard_false_negative is for N = n_hard. NaN when no entry
    of any T_N(b) is known. Returns one float per N.
    """
    logits, order = queue_logits.detach().float().sort(dim=1, descending=True)
    sorted_labels = queue_labels[order]  # [B, K]
    known = torch.isfinite(logits) & (sorted_labels >= 0) & (labels.unsqueeze(1) >= 0)
    same = known & (sorted_labels == labels.unsqueeze(1))
    known_so_far, same_so_far = known.long().cumsum(1), same.long().cumsum(1)
    K = queue_logits.shape[1]
    fractions = []
    for n in top_n:
        if not 1 <= n <= K:
            raise ValueError(f"top-N must be in [1, K={K}], got {n}")
        total = known_so_far[:, n - 1].sum().item()
        fractions.append(same_so_far[:, n - 1].sum().item() / total if total else float("nan"))
    return fractions


def synthetic_harder_than_hardest(logits: torch.Tensor, *, queue_size: int,
                                  sizes: dict[str, int]) -> dict[str, float]:
    """The fraction of synthetic negatives that score above every real negative of their query.

    logits: [B, 1 + K + S] (`mix_logits` with these `sizes`), K = queue_size. With H_b = max_j l_bj
    over the queue (j = 1..K) and S_b the finite synthetic logits of query b (of one type, or all):

        fraction = sum_b sum_{s in S_b} [s > H_b]  /  sum_b |S_b|

    Returns {each registered type's name ("type1", "type2"), "all"}; NaN for a type with no
    synthetic negative.
    """
    logits = logits.detach().float()
    K = queue_size
    hardest = logits[:, 1 : 1 + K].max(dim=1, keepdim=True).values
    blocks = {**type_columns(logits, queue_size=K, sizes=sizes), "all": logits[:, 1 + K :]}
    result = {}
    for name, block in blocks.items():
        finite = torch.isfinite(block)
        count = finite.sum().item()
        result[name] = ((block > hardest) & finite).sum().item() / count if count else float("nan")
    return result


def alignment(z1: torch.Tensor, z2: torch.Tensor, *, alpha: float = 2.0) -> float:
    """Wang and Isola's alignment of positive pairs: mean_i ||z1_i - z2_i||_2^alpha (lower is better).

    z1, z2: [N, d] L2-normalised projections of two views of the same N images. In [0, 2^alpha].
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    return (z1.double() - z2.double()).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: torch.Tensor, *, t: float = 2.0) -> float:
    """Wang and Isola's uniformity: log mean_{i<j} exp(-t ||z_i - z_j||_2^2) (lower is better).

    z: [N, d] L2-normalised projections, N >= 2. In [-4t, 0]; computed as a log-sum-exp in float64.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be [N, d] with N >= 2, got {tuple(z.shape)}")
    squared = torch.pdist(z.double()).square()  # [N (N - 1) / 2]
    return (torch.logsumexp(-t * squared, dim=0) - torch.log(torch.tensor(float(squared.numel()),
                                                                          dtype=torch.float64))).item()


def top_n_grid(queue_size: int, n_hard: int) -> list[int]:
    """The N at which `false_negative_fraction` is reported: 1, 2, 4, ... up to K, and n_hard."""
    grid = {1 << i for i in range(queue_size.bit_length()) if 1 << i <= queue_size} | {queue_size}
    if 1 <= n_hard <= queue_size:
        grid.add(n_hard)
    return sorted(grid)
