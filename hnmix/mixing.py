"""Hard negative mixing (MoCHi, Kalantidis et al., NeurIPS 2020) as pure tensor functions.

Everything here is stateless and knows nothing of processes: `mochi_logits` takes the queries,
their keys and the queue of negatives and returns the contrastive logits, synthetic hard
negatives included.

Synthetic negatives are never materialised. For a query ``q`` and a detached mix
``h = normalise(a*x + c*y)`` the logit is

    q·h = (a q·x + c q·y) / ||a x + c y||,   ||a x + c y||² = a²|x|² + c²|y|² + 2ac x·y

Type 2 mixes the query with a hard negative (x = q, y = n_i): every term is already known from
the queue logits. Type 1 mixes two hard negatives (x = n_i, y = n_j): it needs ``n_i·n_j`` on top,
one dot product per synthetic negative. The gradient reaches ``q`` through ``q·x`` and ``q·y``
only; the denominator is detached, exactly as if ``h`` were a constant vector.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

# Type-1 pairs are gathered in chunks of at most this many elements ([rows, s1, d]), so the
# transient memory of n_i·n_j stays bounded whatever B and s1 are.
_PAIR_CHUNK_ELEMENTS = 1 << 24


class MixingDraws(NamedTuple):
    """Random choices of one call, as positions in each query's sorted hard-negative list.

    pair_i, pair_j: [B, s1] int64, distinct positions of the two mixed hard negatives.
    alpha:          [B, s1] float32, weight of pair_i, ~ U(0, 1).
    single:         [B, s2] int64, position of the hard negative mixed with the query.
    beta:           [B, s2] float32, weight of the query, ~ U(0, 0.5).
    """

    pair_i: torch.Tensor
    pair_j: torch.Tensor
    alpha: torch.Tensor
    single: torch.Tensor
    beta: torch.Tensor


class MixedLogits(NamedTuple):
    """What `mix_logits` computed.

    logits:       [B, 1 + K + s1 + s2] float32, already divided by the temperature.
    hard_indices: [B, n_hard] int64 queue indices of each query's hardest negatives, best first.
    hard_valid:   [B, n_hard] bool, False where fewer than n_hard unmasked entries existed.
    """

    logits: torch.Tensor
    hard_indices: torch.Tensor
    hard_valid: torch.Tensor


def draw_mixing(
    n_valid: torch.Tensor, s1: int, s2: int, generator: Optional[torch.Generator] = None
) -> MixingDraws:
    """Draw the mixing positions and coefficients for every query independently.

    n_valid: [B] int64, how many hard negatives each query has (positions 0..n_valid-1).
    Rows with too few hard negatives (<2 for type 1, <1 for type 2) get position 0; the caller
    masks their synthetic logits. Draw order is fixed (pair_i, pair_j, alpha, single, beta) so a
    seeded generator repeats a call exactly.
    """
    device = n_valid.device
    B = n_valid.shape[0]

    def uniform(cols: int) -> torch.Tensor:
        return torch.rand(B, cols, generator=generator, device=device, dtype=torch.float32)

    def positions(u: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        count = count.clamp_min(1).unsqueeze(1)
        return torch.minimum((u * count).long(), count - 1)

    pair_i = positions(uniform(s1), n_valid)
    pair_j = positions(uniform(s1), n_valid - 1)
    pair_j = pair_j + (pair_j >= pair_i).long()  # skip pair_i: uniform over the other positions
    alpha = uniform(s1)
    single = positions(uniform(s2), n_valid)
    beta = 0.5 * uniform(s2)
    return MixingDraws(pair_i, pair_j, alpha, single, beta)


def validate_mixing_sizes(*, queue_size: int, temperature: float, n_hard: int, s1: int, s2: int) -> None:
    """Raise ValueError naming the size argument and its allowed range."""
    K = queue_size
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, value in (("n_hard", n_hard), ("s1", s1), ("s2", s2)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if n_hard > K:
        raise ValueError(f"n_hard must be in [0, K={K}] (the queue size), got {n_hard}")
    if s1 > 0 and n_hard < 2:
        raise ValueError(f"s1 > 0 mixes two hard negatives: n_hard must be in [2, K={K}], got {n_hard}")
    if s2 > 0 and n_hard < 1:
        raise ValueError(f"s2 > 0 mixes a hard negative: n_hard must be in [1, K={K}], got {n_hard}")


def validate_mixing_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int,
    s1: int,
    s2: int,
    ids: Optional[torch.Tensor],
    queue_ids: Optional[torch.Tensor],
) -> None:
    """Raise ValueError naming the argument and its allowed range."""
    if q.dim() != 2:
        raise ValueError(f"q must be [B, d], got shape {tuple(q.shape)}")
    B, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != d:
        raise ValueError(f"queue must be [K, {d}] (d of q), got shape {tuple(queue.shape)}")
    K = queue.shape[0]
    validate_mixing_sizes(queue_size=K, temperature=temperature, n_hard=n_hard, s1=s1, s2=s2)
    if (ids is None) != (queue_ids is None):
        raise ValueError("ids and queue_ids must be given together (or neither)")
    if ids is not None:
        if ids.shape != (B,):
            raise ValueError(f"ids must be [B={B}], got shape {tuple(ids.shape)}")
        if queue_ids.shape != (K,):
            raise ValueError(f"queue_ids must be [K={K}], got shape {tuple(queue_ids.shape)}")


def _mixed_logit(
    a: torch.Tensor,
    qx: torch.Tensor,
    c: torch.Tensor,
    qy: torch.Tensor,
    xx: torch.Tensor,
    yy: torch.Tensor,
    xy: torch.Tensor,
) -> torch.Tensor:
    """q·normalise(a*x + c*y) from dot products; only qx and qy carry the gradient.

    All arguments broadcast to [B, s]; xx, yy, xy must be detached.
    """
    norm_sq = a * a * xx + c * c * yy + 2 * a * c * xy
    return (a * qx + c * qy) * torch.rsqrt(norm_sq.clamp_min(1e-12))


def _pair_dots(queue: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
    """[B, s] dot products queue[idx_i]·queue[idx_j], gathered in bounded chunks, no grad."""
    B, s = idx_i.shape
    out = torch.empty(B, s, dtype=queue.dtype, device=queue.device)
    rows = max(1, _PAIR_CHUNK_ELEMENTS // max(1, s * queue.shape[1]))
    with torch.no_grad():
        for start in range(0, B, rows):
            sl = slice(start, start + rows)
            out[sl] = (queue[idx_i[sl]] * queue[idx_j[sl]]).sum(-1)
    return out


def mix_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int = 0,
    s1: int = 0,
    s2: int = 0,
    ids: Optional[torch.Tensor] = None,
    queue_ids: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> MixedLogits:
    """`mochi_logits`, also returning which queue entries were the hard negatives."""
    validate_mixing_arguments(
        q, k, queue, temperature=temperature, n_hard=n_hard, s1=s1, s2=s2, ids=ids, queue_ids=queue_ids
    )
    B, K = q.shape[0], queue.shape[0]
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.float()
        k = k.float().detach()
        queue = queue.float().detach()

        pos = (q * k).sum(-1, keepdim=True)  # [B, 1]
        neg = q @ queue.T  # [B, K]
        if ids is not None:
            duplicate = ids.unsqueeze(1) == queue_ids.unsqueeze(0)  # [B, K]
            neg = neg.masked_fill(duplicate, float("-inf"))
            n_unmasked = K - duplicate.sum(1)
        else:
            n_unmasked = torch.full((B,), K, dtype=torch.long, device=q.device)

        if n_hard > 0:
            hard_logits, hard_indices = neg.topk(n_hard, dim=1)  # [B, n_hard], best first
        else:
            hard_logits = neg.new_zeros(B, 0)
            hard_indices = torch.zeros(B, 0, dtype=torch.long, device=q.device)
        n_valid = n_unmasked.clamp_max(n_hard)
        hard_valid = torch.arange(n_hard, device=q.device).unsqueeze(0) < n_valid.unsqueeze(1)

        columns = [pos, neg]
        if s1 or s2:
            draws = draw_mixing(n_valid, s1, s2, generator)
            q_sq = (q * q).sum(-1, keepdim=True).detach()  # [B, 1], 1 up to rounding
            queue_sq = (queue * queue).sum(-1)  # [K]
            hard_sq = queue_sq[hard_indices]  # [B, n_hard]
            # Masked entries are never drawn; zero them so no -inf enters the arithmetic.
            hard_logits = hard_logits.masked_fill(~hard_valid, 0.0)
            hard_detached = hard_logits.detach()
        if s1:
            i, j = draws.pair_i, draws.pair_j
            a = draws.alpha
            pair_dot = _pair_dots(queue, hard_indices.gather(1, i), hard_indices.gather(1, j))
            type1 = _mixed_logit(
                a, hard_logits.gather(1, i), 1 - a, hard_logits.gather(1, j),
                hard_sq.gather(1, i), hard_sq.gather(1, j), pair_dot,
            )
            columns.append(type1.masked_fill((n_valid < 2).unsqueeze(1), float("-inf")))
        if s2:
            b, n = draws.beta, draws.single
            q_self = (q * q.detach()).sum(-1, keepdim=True)  # gradient q_detached
            type2 = _mixed_logit(
                b, q_self, 1 - b, hard_logits.gather(1, n),
                q_sq, hard_sq.gather(1, n), hard_detached.gather(1, n),
            )
            columns.append(type2.masked_fill((n_valid < 1).unsqueeze(1), float("-inf")))
        logits = torch.cat(columns, dim=1) / temperature
    return MixedLogits(logits, hard_indices, hard_valid)


def mochi_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int = 0,
    s1: int = 0,
    s2: int = 0,
    ids: Optional[torch.Tensor] = None,
    queue_ids: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Contrastive logits of MoCo with MoCHi's synthetic hard negatives.

    q:         [B, d] L2-normalised queries; the only input that carries a gradient.
    k:         [B, d] L2-normalised keys (positives).
    queue:     [K, d] L2-normalised negatives.
    ids:       [B] dataset index of each query; queue_ids: [K] of each queue entry (-1: empty).
               A queue entry with the query's own id is masked to -inf and never mixed.
    n_hard:    how many of the highest-scoring unmasked queue entries are each query's hard set.
    s1:        type-1 negatives per query, normalise(a n_i + (1-a) n_j), i != j, a ~ U(0, 1).
    s2:        type-2 negatives per query, normalise(b q + (1-b) n_i), b ~ U(0, 0.5), q detached.
    generator: source of the random draws (on q's device); the global RNG when None.

    Returns float32 logits [B, 1 + K + s1 + s2] divided by `temperature`, whatever the input
    dtype or autocast: column 0 is the positive (the target class), 1..K the queue, then type 1,
    then type 2. A query with fewer unmasked entries than a type needs gets -inf there.
    """
    return mix_logits(
        q, k, queue, temperature=temperature, n_hard=n_hard, s1=s1, s2=s2,
        ids=ids, queue_ids=queue_ids, generator=generator,
    ).logits
