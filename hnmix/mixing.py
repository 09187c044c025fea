"""Hard negative mixing (MoCHi, Kalantidis et al., NeurIPS 2020) as pure tensor functions.

Everything here is stateless and knows nothing of processes: `mix_logits` takes the queries,
their keys and the queue of negatives and returns the contrastive logits, synthetic hard
negatives included.

A synthetic negative is h = normalise(a x + (1 - a) y): y is one of the query's hard negatives,
x the query itself or another of its hard negatives, a drawn for each negative. A
`NegativeType` says which x and how a is drawn, and `NEGATIVE_TYPES` holds MoCHi's two:

    type1  x = n_i, y = n_j (j != i), a ~ U(0, 1)     two hard negatives mixed
    type2  x = q,   y = n_i,          a ~ U(0, 0.5)   the query mixed with a hard negative

Any affine mix of two such vectors is a type: SynCo's extrapolation normalise(q + λ(q - n)) is
x = q, y = n, a = 1 + λ. Options, statistics, model card and curves iterate over the registry.

Synthetic negatives are never materialised. Every type's logit has one closed form,

    q·h = (a q·x + c q·y) / ||a x + c y||,   ||a x + c y||² = a²|x|² + c²|y|² + 2ac x·y,  c = 1 - a

whose terms are known from the queue logits (q·n), q·q and the queue norms, plus one dot
product n_i·n_j per negative when x is a hard negative. The gradient reaches q through q·x and
q·y only; the denominator is detached, exactly as if h were a constant vector. That gradient is
written out by hand (`_MochiLogits`): every q·queue term, synthetic ones included, goes through
one [B, K] @ [K, d] product, and no [B, K] tensor is built that plain MoCo does not need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class NegativeType:
    """One kind of synthetic negative: normalise(a x + (1 - a) y), y one of the query's hard negatives.

    name:          "type1": the statistic `logit_type1`, `type1_from` on the model card.
    label:         "type-1", as texts name it.
    size:          the keyword of its count in `mix_logits` ("s1").
    x:             "query", or "hard": another hard negative than y, uniform over the others.
    a_range:       a ~ U(low, high).
    mixes:         what it needs, for the one-line errors ("two hard negatives").
    about:         what it is, for help texts and the model card ("two hard negatives mixed").
    count_option:  the training option of its count per query ("s1_hard").
    start_option:  the training option of its first step ("start1_hard").
    """

    name: str
    label: str
    size: str
    x: str
    a_range: tuple[float, float]
    mixes: str
    about: str
    count_option: str
    start_option: str

    @property
    def hard_needed(self) -> int:
        """Hard negatives a query needs for this type."""
        return 2 if self.x == "hard" else 1


NEGATIVE_TYPES: dict[str, NegativeType] = {}


def register_negative_type(kind: NegativeType) -> NegativeType:
    """Add a type after those registered: its logits come after theirs."""
    taken = {name for t in NEGATIVE_TYPES.values() for name in (t.name, t.size, t.count_option, t.start_option)}
    if {kind.name, kind.size, kind.count_option, kind.start_option} & taken or kind.x not in ("query", "hard"):
        raise ValueError(f"negative type {kind} clashes with a registered one or has x not in (query, hard)")
    NEGATIVE_TYPES[kind.name] = kind
    return kind


register_negative_type(NegativeType("type1", "type-1", "s1", "hard", (0.0, 1.0), "two hard negatives",
                                    "two hard negatives mixed", "s1_hard", "start1_hard"))
register_negative_type(NegativeType("type2", "type-2", "s2", "query", (0.0, 0.5), "a hard negative",
                                    "query mixed with a hard negative", "s2_hard", "start2_hard"))

Active = tuple[tuple[NegativeType, int], ...]


def active_types(sizes: dict[str, int]) -> Active:
    """(type, count) of the registered types with a count > 0 in `sizes` (keyed by `size`), in order."""
    known = {t.size for t in NEGATIVE_TYPES.values()}
    if set(sizes) - known:
        raise TypeError(f"unknown mixing sizes {sorted(set(sizes) - known)}; the registered ones are {sorted(known)}")
    return tuple((t, sizes[t.size]) for t in NEGATIVE_TYPES.values() if sizes.get(t.size, 0) > 0)


class _Block(NamedTuple):
    """One active type's n columns: `column` among the S synthetic negatives (logits, weights), `y`
    among the X + S positions, `x` among them too when x is a hard negative (None: x is q)."""

    kind: NegativeType
    n: int
    column: slice
    x: Optional[slice]
    y: slice


class _Layout(NamedTuple):
    """The active types' blocks; `pairs` and `on_query` the columns of those whose x is a hard
    negative (X columns in all, the first X positions) and of those whose x is the query."""

    blocks: tuple[_Block, ...]
    pairs: tuple[slice, ...]
    on_query: tuple[slice, ...]
    X: int
    S: int


def _layout(active: Active) -> _Layout:
    X = sum(n for kind, n in active if kind.x == "hard")
    blocks, start, x_start = [], 0, 0
    for kind, n in active:
        x = slice(x_start, x_start + n) if kind.x == "hard" else None
        x_start += n if x else 0
        blocks.append(_Block(kind, n, slice(start, start + n), x, slice(X + start, X + start + n)))
        start += n
    pairs = tuple(b.column for b in blocks if b.x)
    return _Layout(tuple(blocks), pairs, tuple(b.column for b in blocks if not b.x), X, start)


def _take(t: torch.Tensor, slices: tuple[slice, ...]) -> torch.Tensor:
    """The columns of t [B, n] in `slices`, side by side (a view when they are one slice)."""
    if len(slices) == 1:
        return t[:, slices[0]]
    return torch.cat([t[:, s] for s in slices], dim=1) if slices else t[:, :0]


class MixingDraws(NamedTuple):
    """Random choices of one call, as positions in each query's sorted hard-negative list.

    types:     the active (type, count), in the order of their logits.
    positions: [B, X + S] int64: the x positions of the types mixing two hard negatives (X
               columns, distinct from their y), then the y position of every synthetic negative.
    weights:   [B, S] float32, a of every synthetic negative.
    blocked:   [B, S] bool, True where the query has fewer hard negatives than the type needs.
    """

    types: Active
    positions: torch.Tensor
    weights: torch.Tensor
    blocked: torch.Tensor

    def of(self, name: str) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(x positions or None, y positions, a) of one type, [B, count] each; empty if inactive."""
        for block in _layout(self.types).blocks:
            if block.kind.name == name:
                x = None if block.x is None else self.positions[:, block.x]
                return x, self.positions[:, block.y], self.weights[:, block.column]
        empty = self.positions[:, :0]
        return (empty if NEGATIVE_TYPES[name].x == "hard" else None), empty, self.weights[:, :0]

    # MoCHi's names: type 1 mixes pair_i and pair_j with alpha, type 2 the query with single, beta.
    pair_i = property(lambda self: self.of("type1")[0])
    pair_j = property(lambda self: self.of("type1")[1])
    alpha = property(lambda self: self.of("type1")[2])
    single = property(lambda self: self.of("type2")[1])
    beta = property(lambda self: self.of("type2")[2])


class MixedLogits(NamedTuple):
    """What `mix_logits` computed.

    logits:       [B, 1 + K + S] float32, already divided by the temperature; S = the counts of
                  the types, their columns in the registry's order.
    hard_indices: [B, n_hard] int64 queue indices of each query's hardest negatives, best first.
    hard_valid:   [B, n_hard] bool, False where fewer than n_hard unmasked entries existed.
    """

    logits: torch.Tensor
    hard_indices: torch.Tensor
    hard_valid: torch.Tensor


def draw_types(n_valid: torch.Tensor, active: Active, generator: Optional[torch.Generator] = None) -> MixingDraws:
    """Draw the mixing positions and coefficients for every query independently.

    n_valid: [B] int64, how many hard negatives each query has (positions 0..n_valid-1).
    Rows with fewer than a type needs get position 0 and `blocked`; the caller masks their
    logits. One uniform draw [B, X + 2S] feeds everything, its columns in a fixed order (x
    positions, y positions, weights), so a seeded generator repeats a call exactly; the
    positions are computed side by side: each op costs a kernel launch whatever its size, so a
    handful of ops over all columns beats one set per type.
    """
    B = n_valid.shape[0]
    layout = _layout(active)
    X, S = layout.X, layout.S
    uniform = torch.rand(B, X + 2 * S, generator=generator, device=n_valid.device, dtype=torch.float32)
    counts = n_valid.unsqueeze(1).expand(B, X + S).clone()
    pairs = [block for block in layout.blocks if block.x]
    for block in pairs:
        counts[:, block.y].sub_(1)  # y skips x: one position fewer
    blocked = counts[:, X:] < 1
    # floor(u * count) < count: a float32 u < 1 is at most 1 - 2^-24, and the float32 product of
    # that with an integer count < 2^24 rounds below the count.
    positions = (uniform[:, : X + S] * counts.clamp_min_(1)).long()
    for block in pairs:
        y = positions[:, block.y]
        y += y >= positions[:, block.x]  # uniform over the other positions
    weights = uniform[:, X + S :]
    for block in layout.blocks:
        low, high, column = *block.kind.a_range, block.column
        if high - low != 1:
            weights[:, column].mul_(high - low)
        if low:
            weights[:, column].add_(low)
    return MixingDraws(active, positions, weights, blocked)


def draw_mixing(n_valid: torch.Tensor, s1: int = 0, s2: int = 0, generator: Optional[torch.Generator] = None,
                **sizes: int) -> MixingDraws:
    """`draw_types` of the types with these counts (MoCHi's s1 and s2, and any other by its size)."""
    return draw_types(n_valid, active_types(dict(s1=s1, s2=s2, **sizes)), generator)


def validate_mixing_sizes(*, queue_size: int, temperature: float, n_hard: int, queue_name: str = "K",
                          **sizes: int) -> None:
    """Raise ValueError naming the size and its allowed range: the one check of the mixing sizes.

    sizes: each type's count, by its `size` ("s1") or its `count_option` ("s1_hard"), the name
    the message uses; `queue_name` names the queue size.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kinds = {name: t for t in NEGATIVE_TYPES.values() for name in (t.size, t.count_option)}
    if set(sizes) - set(kinds):
        raise TypeError(f"unknown mixing sizes {sorted(set(sizes) - set(kinds))}")
    for name, value in {"n_hard": n_hard, **sizes}.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if n_hard > queue_size:
        raise ValueError(f"n_hard must be <= {queue_name}={queue_size} (the queue size), got {n_hard}")
    for name, value in sizes.items():
        if value > 0 and n_hard < kinds[name].hard_needed:
            raise ValueError(f"{name} > 0 mixes {kinds[name].mixes}: n_hard must be >= {kinds[name].hard_needed}, "
                             f"got {n_hard}")


def validate_mixing_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int,
    ids: Optional[torch.Tensor],
    queue_ids: Optional[torch.Tensor],
    **sizes: int,
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
    validate_mixing_sizes(queue_size=K, temperature=temperature, n_hard=n_hard, **sizes)
    if (ids is None) != (queue_ids is None):
        raise ValueError("ids and queue_ids must be given together (or neither)")
    if ids is not None:
        if ids.shape != (B,):
            raise ValueError(f"ids must be [B={B}], got shape {tuple(ids.shape)}")
        if queue_ids.shape != (K,):
            raise ValueError(f"queue_ids must be [K={K}], got shape {tuple(queue_ids.shape)}")


class _SyntheticGrad(NamedTuple):
    """What the gradient of the synthetic logits w.r.t. q needs.

    index:        [B, X + S] the queue entries mixed, laid out like `MixingDraws.positions`.
    weight:       [B, X + S] d logit / d(q·queue[index]) of those entries; 0 where masked.
    self_weight:  [B, S_q] d logit / d(q·q) of the types mixing the query, q's own share; 0 where masked.
    """

    index: torch.Tensor
    weight: torch.Tensor
    self_weight: torch.Tensor


def _synthetic_logits(
    q: torch.Tensor,
    queue: torch.Tensor,
    hard_logits: torch.Tensor,
    hard_indices: torch.Tensor,
    draws: MixingDraws,
    out: torch.Tensor,
) -> _SyntheticGrad:
    """Write q·normalise(a x + (1 - a) y) of every active type into out [B, S], -inf where masked.

    q: [B, d]; queue: [K, d]; hard_logits, hard_indices: [B, n_hard] (q·queue and the queue
    index, best first). All types share each op on [B, S]: ops this small cost about the same
    whatever their size (a parallel region each on CPU, a launch on GPU), so their number is
    what counts.
    """
    B = q.shape[0]
    layout = _layout(draws.types)
    X, S = layout.X, layout.S
    index = hard_indices.gather(1, draws.positions)
    q_dot = hard_logits.gather(1, draws.positions)  # -inf only in masked rows
    sq_norm = torch.linalg.vector_norm(queue, dim=1)[index].square_()
    q_sq = torch.linalg.vecdot(q, q).unsqueeze(1)  # 1 up to rounding

    # [B, S] each: q·x, |x|², q·y, |y|², x·y.
    qx = [q_dot[:, b.x] if b.x else q_sq.expand(B, b.n) for b in layout.blocks]
    xx = [sq_norm[:, b.x] if b.x else q_sq.expand(B, b.n) for b in layout.blocks]
    qx, xx = torch.cat(qx + xx, dim=1).split(S, dim=1)
    qy, yy = q_dot[:, X:], sq_norm[:, X:]
    xy = torch.empty_like(qy)
    for b in layout.blocks:
        if b.x:
            _pair_dots(queue, torch.stack([index[:, b.x], index[:, b.y]], dim=1), out=xy[:, b.column])
        else:
            xy[:, b.column] = qy[:, b.column]  # x = q

    a = draws.weights
    # |a x + c y|² = a x·(a x + c y) + c y·(a x + c y), c = 1 - a: three lerps.
    norm_sq = torch.lerp(torch.lerp(yy, xy, a), torch.lerp(xy, xx, a), a)
    scale = norm_sq.clamp_min_(1e-12).rsqrt_().masked_fill_(draws.blocked, 0.0)
    torch.mul(torch.lerp(qy, qx, a), scale, out=out).masked_fill_(draws.blocked, float("-inf"))  # a q·x + c q·y

    scaled_a = a * scale
    weight = torch.cat([_take(scaled_a, layout.pairs), scale - scaled_a], dim=1)  # laid out like index
    return _SyntheticGrad(index, weight, self_weight=_take(scaled_a, layout.on_query))


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
    layout: _Layout,
    q: torch.Tensor,
    grad_neg: torch.Tensor,
    grad_q: torch.Tensor,
) -> None:
    """Add the gradient of the synthetic logits in place: its q·queue terms to grad_neg [B, K],
    its q·q terms to grad_q [B, d]. grad_synthetic: [B, S], the incoming gradient."""
    # A logit mixing two queue entries passes its gradient to both.
    grad_mixed = torch.cat([_take(grad_synthetic, layout.pairs), grad_synthetic], dim=1)  # laid out like index
    grad_neg.scatter_add_(1, synthetic.index, synthetic.weight * grad_mixed)
    if layout.on_query:
        grad_on_q = torch.linalg.vecdot(synthetic.self_weight, _take(grad_synthetic, layout.on_query))
        grad_q.addcmul_(grad_on_q.unsqueeze(1), q)


class _MochiLogits(torch.autograd.Function):
    """Logits [B, 1 + K + S] and their gradient w.r.t. q, in as few [B, K] passes as possible.

    A [B, K] float32 tensor is tens of MiB, and a fresh one costs its page faults on top of the
    pass. Forward writes the queue logits straight into the output and masks and divides them in
    place; backward folds every q·queue term, synthetic ones included, into one [B, K] @ [K, d].
    """

    @staticmethod
    def forward(ctx, q, k, queue, ids, queue_ids, temperature, n_hard, active, generator):
        B, K = q.shape[0], queue.shape[0]
        layout = _layout(active)
        logits = q.new_empty(B, 1 + K + layout.S)
        duplicate = _queue_logits(q, k, queue, ids, queue_ids, out=logits[:, : 1 + K])
        synthetic = _SyntheticGrad(None, None, None)
        if n_hard > 0:
            hard_logits, hard_indices, hard_valid = _hard_negatives(logits[:, 1 : 1 + K], n_hard)
            if active:
                draws = draw_types(hard_valid.sum(1), active, generator)
                synthetic = _synthetic_logits(q, queue, hard_logits, hard_indices, draws, out=logits[:, 1 + K :])
        else:
            hard_indices = torch.zeros(B, 0, dtype=torch.long, device=q.device)
            hard_valid = torch.zeros(B, 0, dtype=torch.bool, device=q.device)
        logits.div_(temperature)

        ctx.temperature, ctx.layout = temperature, layout
        ctx.save_for_backward(q, k, queue, duplicate, *synthetic)
        ctx.mark_non_differentiable(hard_indices, hard_valid)
        ctx.set_materialize_grads(False)
        return logits, hard_indices, hard_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_hard_indices, _grad_hard_valid):
        if grad is None:
            return (None,) * 9
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
                _add_synthetic_grad(grad[:, 1 + K :], synthetic, ctx.layout, q, grad_neg, grad_q)
            grad_q = torch.addmm(grad_q, grad_neg, queue, beta=1 / ctx.temperature, alpha=1 / ctx.temperature)
        return (grad_q,) + (None,) * 8


def mix_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    n_hard: int = 0,
    ids: Optional[torch.Tensor] = None,
    queue_ids: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    **sizes: int,
) -> MixedLogits:
    """Contrastive logits of MoCo with synthetic hard negatives, and which queue entries were hard.

    q:         [B, d] L2-normalised queries; the only input that carries a gradient.
    k:         [B, d] L2-normalised keys (positives).
    queue:     [K, d] L2-normalised negatives.
    ids:       [B] dataset index of each query; queue_ids: [K] of each queue entry (-1: empty).
               A queue entry with the query's own id is masked to -inf and never mixed.
    n_hard:    how many of the highest-scoring unmasked queue entries are each query's hard set.
    sizes:     synthetic negatives per query of each registered type, by its `size` (0 when
               left out): MoCHi's s1 (normalise(a n_i + (1-a) n_j), i != j, a ~ U(0, 1)) and s2
               (normalise(b q + (1-b) n_i), b ~ U(0, 0.5), q detached).
    generator: source of the random draws (on q's device); the global RNG when None.

    Returns float32 logits [B, 1 + K + S] divided by `temperature`, whatever the input dtype or
    autocast: column 0 is the positive (the target class), 1..K the queue, then each type's in
    the registry's order. A query with fewer unmasked entries than a type needs gets -inf there.
    """
    validate_mixing_arguments(q, k, queue, temperature=temperature, n_hard=n_hard, ids=ids, queue_ids=queue_ids,
                              **sizes)
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits, hard_indices, hard_valid = _MochiLogits.apply(
            q.float(), k.float().detach(), queue.float().detach(), ids, queue_ids,
            temperature, n_hard, active_types(sizes), generator,
        )
    return MixedLogits(logits, hard_indices, hard_valid)
