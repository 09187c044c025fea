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
only; the denominator is detached, exactly as if ``h`` were a constant vector. That gradient is
written out by hand (`_MochiLogits`): every q·queue term, synthetic ones included, goes through
one [B, K] @ [K, d] product, and no [B, K] tensor is built that plain MoCo does not need.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable


class MixingDraws(NamedTuple):
    """Random choices of one call, as positions in each query's sorted hard-negative list.

    pair_i, pair_j: [B, s1] int64, distinct positions of the two mixed hard negatives.
    alpha:          [B, s1] float32, weight of pair_i, ~ U(0, 1).
    single:         [B, s2] int64, position of the hard negative mixed with the query.
    beta:           [B, s2] float32, weight of the query, ~ U(0, 0.5).
    positions:      [B, 2*s1 + s2] int64, pair_i, pair_j and single side by side, or None;
                    `draw_mixing` gives it, and the three fields above are its columns.
    weights:        [B, s1 + s2] float32, alpha and beta side by side, or None (as positions).
    blocked:        [B, s1 + s2] bool, True where the query has too few hard negatives for the
                    type (type 1 needs two, type 2 one), or None (as positions).
    """

    pair_i: torch.Tensor
    pair_j: torch.Tensor
    alpha: torch.Tensor
    single: torch.Tensor
    beta: torch.Tensor
    positions: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    blocked: Optional[torch.Tensor] = None


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
    masks their synthetic logits. One uniform draw [B, 3*s1 + 2*s2] feeds everything, its
    columns in a fixed order (pair_i, pair_j, single, alpha, beta), so a seeded generator repeats
    a call exactly; the positions are computed side by side: each op costs a kernel launch
    whatever its size, so a handful of ops over all columns beats one set per field.
    """
    B = n_valid.shape[0]
    uniform = torch.rand(B, 3 * s1 + 2 * s2, generator=generator, device=n_valid.device, dtype=torch.float32)
    # How many positions each column draws from: pair_j skips pair_i, so one fewer.
    counts = n_valid.unsqueeze(1).expand(B, 2 * s1 + s2).clone()
    counts[:, s1 : 2 * s1].sub_(1)
    blocked = counts[:, s1:] < 1  # pair_j's columns for type 1, single's for type 2
    # floor(u * count) < count: a float32 u < 1 is at most 1 - 2^-24, and the float32 product of
    # that with an integer count < 2^24 rounds below the count.
    positions = (uniform[:, : 2 * s1 + s2] * counts.clamp_min_(1)).long()
    pair_i, pair_j, single = positions[:, :s1], positions[:, s1 : 2 * s1], positions[:, 2 * s1 :]
    pair_j += pair_j >= pair_i  # skip pair_i: uniform over the other positions
    weights = uniform[:, 2 * s1 + s2 :]
    weights[:, s1:].mul_(0.5)  # beta ~ U(0, 0.5)
    return MixingDraws(pair_i, pair_j, weights[:, :s1], single, weights[:, s1:], positions, weights, blocked)


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


def _pair_chunk_elements(device: torch.device) -> int:
    """How many elements the gather buffer of `_pair_dots` may hold (float32: 64 MiB on CPU, 128 MiB on GPU).

    The buffer bounds the memory whatever B and s1 are. Smaller buffers stay in cache, but each
    chunk costs three ops, and on a busy CPU every op waits for its threads to be scheduled:
    a handful of chunks is the better trade. On a GPU fewer chunks save kernel launches.
    """
    return 1 << 25 if device.type == "cuda" else 1 << 24


def _pair_dots(queue: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write queue[pairs[:, 0]]·queue[pairs[:, 1]] into out [B, s], a few rows of B at a time.

    queue: [K, d]; pairs: [B, 2, s] queue indices. One [rows, 2, s, d] buffer, reused.
    """
    B, _, s = pairs.shape
    d = queue.shape[1]
    pairs = pairs.contiguous()
    rows = max(1, min(B, _pair_chunk_elements(queue.device) // max(1, 2 * s * d)))
    buffer = queue.new_empty(rows, 2, s, d)
    for start in range(0, B, rows):
        chunk = pairs[start : start + rows]
        n = chunk.shape[0]
        torch.index_select(queue, 0, chunk.view(-1), out=buffer[:n].view(-1, d))
        torch.sum(buffer[:n, 0].mul_(buffer[:n, 1]), dim=2, out=out[start : start + n])
    return out


class _SyntheticGrad(NamedTuple):
    """What the gradient of the synthetic logits w.r.t. q needs.

    index:        [B, 2*s1 + s2] the queue entries mixed: n_i of type 1, n_j of type 1, n_i of type 2.
    weight:       [B, 2*s1 + s2] d logit / d(q·queue[index]) of those entries; 0 where masked.
    self_weight:  [B, s2] d logit / d(q·q) of type 2, q's own share; 0 where masked.
    """

    index: torch.Tensor
    weight: torch.Tensor
    self_weight: torch.Tensor


def _synthetic_logits(
    q: torch.Tensor,
    queue: torch.Tensor,
    hard_logits: torch.Tensor,
    hard_indices: torch.Tensor,
    hard_valid: torch.Tensor,
    draws: MixingDraws,
    out: torch.Tensor,
) -> _SyntheticGrad:
    """Write q·normalise(a x + c y) of both types into out [B, s1 + s2], -inf where masked.

    q: [B, d]; queue: [K, d]; hard_logits, hard_indices, hard_valid: [B, n_hard] (q·queue, best
    first, and which of them are unmasked). Type 1 is x = n_i, y = n_j, a = alpha; type 2 is
    x = q, y = n_i, a = beta. Both types share each op on [B, s1 + s2]: ops this small cost about
    the same whatever their size (a parallel region each on CPU, a launch on GPU), so their
    number is what counts.
    """
    B, s1 = draws.alpha.shape
    s2 = draws.beta.shape[1]
    positions = (torch.cat([draws.pair_i, draws.pair_j, draws.single], dim=1) if draws.positions is None
                 else draws.positions)  # [B, 2*s1 + s2]
    a = torch.cat([draws.alpha, draws.beta], dim=1) if draws.weights is None else draws.weights
    index = hard_indices.gather(1, positions)
    q_dot = hard_logits.gather(1, positions)  # -inf only in masked rows
    sq_norm = torch.linalg.vector_norm(queue, dim=1)[index].square_()
    q_sq = torch.linalg.vecdot(q, q).unsqueeze(1).expand(B, s2)  # 1 up to rounding

    # [B, s1 + s2] each: q·x, q·y, |x|², |y|², x·y.
    qx, xx = torch.cat([q_dot[:, :s1], q_sq, sq_norm[:, :s1], q_sq], dim=1).split(s1 + s2, dim=1)
    qy = q_dot[:, s1:]
    yy = sq_norm[:, s1:]
    xy = torch.empty_like(qy)
    _pair_dots(queue, index[:, : 2 * s1].view(B, 2, s1), out=xy[:, :s1])
    xy[:, s1:] = q_dot[:, 2 * s1 :]

    # |a x + c y|² = a x·(a x + c y) + c y·(a x + c y), c = 1 - a: three lerps.
    norm_sq = torch.lerp(torch.lerp(yy, xy, a), torch.lerp(xy, xx, a), a)
    blocked = draws.blocked
    if blocked is None:  # type 1 needs two hard negatives (hard_valid[:, 1]), type 2 one (hard_valid[:, 0])
        blocked = hard_valid[:, :2].logical_not()
        blocked = torch.cat([blocked[:, 1:2].expand(B, s1), blocked[:, :1].expand(B, s2)], dim=1)
    scale = norm_sq.clamp_min_(1e-12).rsqrt_().masked_fill_(blocked, 0.0)
    torch.mul(torch.lerp(qy, qx, a), scale, out=out).masked_fill_(blocked, float("-inf"))  # a q·x + c q·y

    scaled_a = a * scale
    weight = torch.cat([scaled_a[:, :s1], scale - scaled_a], dim=1)  # laid out like index: a, c, c times scale
    return _SyntheticGrad(index, weight, self_weight=scaled_a[:, s1:])


def _queue_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    ids: Optional[torch.Tensor],
    queue_ids: Optional[torch.Tensor],
    out: torch.Tensor,
) -> Optional[torch.Tensor]:
    """Write [q·k, q·queue] into out [B, 1 + K], -inf where the query's own id is in the queue.

    Returns the [B, K] bool mask of those duplicates, or None without ids.
    """
    torch.linalg.vecdot(q, k, out=out[:, 0])
    neg = out[:, 1:]
    torch.mm(q, queue.T, out=neg)
    if ids is None:
        return None
    duplicate = ids.unsqueeze(1) == queue_ids.unsqueeze(0)
    neg.masked_fill_(duplicate, float("-inf"))
    return duplicate


def _hard_negatives(neg: torch.Tensor, n_hard: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n_hard highest of neg [B, K] per row, best first: (logits, indices, valid [B, n_hard] bool).

    Masked entries are -inf and sort after every (finite) unmasked one, so the unmasked ones
    among the chosen are exactly the finite ones, and come first.
    """
    hard_logits, hard_indices = neg.topk(n_hard, dim=1)
    return hard_logits, hard_indices, torch.isfinite(hard_logits)


def _add_synthetic_grad(
    grad_synthetic: torch.Tensor,
    synthetic: _SyntheticGrad,
    q: torch.Tensor,
    grad_neg: torch.Tensor,
    grad_q: torch.Tensor,
) -> None:
    """Add the gradient of the synthetic logits in place: its q·queue terms to grad_neg [B, K],
    its q·q terms to grad_q [B, d]. grad_synthetic: [B, s1 + s2], the incoming gradient."""
    s1 = synthetic.index.shape[1] - grad_synthetic.shape[1]
    # Type-1 logits depend on two queue entries: their gradient is used twice.
    grad_mixed = torch.cat([grad_synthetic[:, :s1], grad_synthetic], dim=1)  # laid out like index
    grad_neg.scatter_add_(1, synthetic.index, synthetic.weight * grad_mixed)
    grad_q.addcmul_(torch.linalg.vecdot(synthetic.self_weight, grad_synthetic[:, s1:]).unsqueeze(1), q)


class _MochiLogits(torch.autograd.Function):
    """Logits [B, 1 + K + s1 + s2] and their gradient w.r.t. q, in as few [B, K] passes as possible.

    A [B, K] float32 tensor is tens of MiB, and a fresh one costs its page faults on top of the
    pass. Forward writes the queue logits straight into the output and masks and divides them in
    place; backward folds every q·queue term, synthetic ones included, into one [B, K] @ [K, d].
    """

    @staticmethod
    def forward(ctx, q, k, queue, ids, queue_ids, temperature, n_hard, s1, s2, generator):
        B, K = q.shape[0], queue.shape[0]
        logits = q.new_empty(B, 1 + K + s1 + s2)
        duplicate = _queue_logits(q, k, queue, ids, queue_ids, out=logits[:, : 1 + K])
        synthetic = _SyntheticGrad(None, None, None)
        if n_hard > 0:
            hard_logits, hard_indices, hard_valid = _hard_negatives(logits[:, 1 : 1 + K], n_hard)
            if s1 or s2:
                draws = draw_mixing(hard_valid.sum(1), s1, s2, generator)
                synthetic = _synthetic_logits(
                    q, queue, hard_logits, hard_indices, hard_valid, draws, out=logits[:, 1 + K :]
                )
        else:
            hard_indices = torch.zeros(B, 0, dtype=torch.long, device=q.device)
            hard_valid = torch.zeros(B, 0, dtype=torch.bool, device=q.device)
        logits.div_(temperature)

        ctx.temperature = temperature
        ctx.save_for_backward(q, k, queue, duplicate, *synthetic)
        ctx.mark_non_differentiable(hard_indices, hard_valid)
        ctx.set_materialize_grads(False)
        return logits, hard_indices, hard_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_hard_indices, _grad_hard_valid):
        if grad is None:
            return (None,) * 10
        q, k, queue, duplicate, *synthetic = ctx.saved_tensors
        synthetic = None if synthetic[0] is None else _SyntheticGrad(*synthetic)
        K = queue.shape[0]
        with torch.autocast(device_type=grad.device.type, enabled=False):
            grad_neg = grad[:, 1 : 1 + K]
            if duplicate is not None:
                grad_neg = torch.where(duplicate, 0.0, grad_neg)  # a constant -inf there
            elif synthetic is not None:
                grad_neg = grad_neg.clone()  # written to below
            grad_q = grad[:, :1] * k
            if synthetic is not None:
                _add_synthetic_grad(grad[:, 1 + K :], synthetic, q, grad_neg, grad_q)
            grad_q = torch.addmm(grad_q, grad_neg, queue, beta=1 / ctx.temperature, alpha=1 / ctx.temperature)
        return (grad_q,) + (None,) * 9


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
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits, hard_indices, hard_valid = _MochiLogits.apply(
            q.float(), k.float().detach(), queue.float().detach(), ids, queue_ids,
            temperature, n_hard, s1, s2, generator,
        )
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
