"""hnmix.mixing: exactness against the float64 oracle, masking, draws, and argument checks."""

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_logits

from hnmix import mixing
from hnmix.mixing import draw_mixing, mix_logits


def unit(*shape, generator, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).to(dtype)


def make_inputs(B, K, d, *, seed=0, dtype=torch.float32, duplicates=True):
    g = torch.Generator().manual_seed(seed)
    q = unit(B, d, generator=g, dtype=dtype)
    k = unit(B, d, generator=g, dtype=dtype)
    queue = unit(K, d, generator=g, dtype=dtype)
    ids = torch.arange(B)
    # About one queue entry in four is an earlier key of some query in the batch.
    queue_ids = torch.where(torch.rand(K, generator=g) < 0.25, torch.randint(0, B, (K,), generator=g), -1)
    if not duplicates:
        queue_ids = torch.full((K,), -1)
    return q, k, queue, ids, queue_ids


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| over finite entries; inf where finiteness differs."""
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected)[finite].abs().max() / expected[finite].abs().max())


SIZES = [
    # B, K, d, n_hard, s1, s2
    (4, 16, 8, 4, 3, 2),
    (8, 64, 16, 10, 5, 4),
    (16, 128, 32, 32, 16, 16),
    (5, 40, 128, 40, 7, 0),  # n_hard = K
    (6, 32, 24, 6, 0, 9),
    (3, 50, 10, 1, 0, 4),  # a single hard negative
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,d,n_hard,s1,s2", SIZES)
def test_logits_and_gradient_match_the_materialising_float64_oracle(B, K, d, n_hard, s1, s2, dtype):
    q, k, queue, ids, queue_ids = make_inputs(B, K, d, dtype=dtype)
    kwargs = dict(temperature=0.07, n_hard=n_hard, s1=s1, s2=s2, ids=ids, queue_ids=queue_ids)
    q_fast = q.clone().requires_grad_()
    q_oracle = q.double().requires_grad_()

    fast = mix_logits(q_fast, k, queue, generator=torch.Generator().manual_seed(7), **kwargs).logits
    expected, _ = oracle_logits(q_oracle, k, queue, generator=torch.Generator().manual_seed(7), **kwargs)

    assert fast.dtype == torch.float32
    assert fast.shape == (B, 1 + K + s1 + s2)
    assert relative_error(fast, expected) <= 1e-6

    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = weights.masked_fill(~torch.isfinite(expected), 0)
    (fast * weights.float()).sum().backward()
    (expected * weights).sum().backward()
    # A bf16 leaf receives its gradient rounded to bf16 (8 bits of mantissa): exact up to that.
    tolerance = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert q_fast.grad.dtype == dtype
    assert relative_error(q_fast.grad, q_oracle.grad) <= tolerance


def _compare_with_oracle(q, k, queue, **kwargs):
    """Relative errors (logits, q-gradient) of mix_logits against the float64 oracle."""
    q_fast = q.clone().requires_grad_()
    q_oracle = q.double().requires_grad_()
    fast = mix_logits(q_fast, k, queue, generator=torch.Generator().manual_seed(7), **kwargs).logits
    expected, _ = oracle_logits(q_oracle, k, queue, generator=torch.Generator().manual_seed(7), **kwargs)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = weights.masked_fill(~torch.isfinite(expected), 0)
    (fast * weights.float()).sum().backward()
    (expected * weights).sum().backward()
    return relative_error(fast, expected), relative_error(q_fast.grad, q_oracle.grad)


def test_type1_dot_products_in_several_chunks_match_the_oracle(monkeypatch):
    B, K, d, s1 = 8, 64, 16, 5
    # Room for 3 rows of B per chunk: chunks of 3, 3 and 2 rows.
    monkeypatch.setattr(mixing, "_pair_chunk_elements", lambda device: 3 * 2 * s1 * d)
    q, k, queue, ids, queue_ids = make_inputs(B, K, d)
    kwargs = dict(temperature=0.07, n_hard=10, s1=s1, s2=3, ids=ids, queue_ids=queue_ids)
    assert max(_compare_with_oracle(q, k, queue, **kwargs)) <= 1e-6


def test_without_ids_matches_the_oracle():
    q, k, queue, *_ = make_inputs(8, 64, 16)
    assert max(_compare_with_oracle(q, k, queue, temperature=0.07, n_hard=10, s1=5, s2=4)) <= 1e-6


def test_backward_can_run_twice_on_a_retained_graph():
    q, k, queue, ids, queue_ids = make_inputs(8, 64, 16)
    q.requires_grad_()
    logits = mix_logits(q, k, queue, temperature=0.2, n_hard=10, s1=5, s2=4, ids=ids, queue_ids=queue_ids).logits
    loss = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    loss.backward(retain_graph=True)
    first = q.grad.clone()
    loss.backward()
    torch.testing.assert_close(q.grad, 2 * first)


def test_hard_negatives_are_the_highest_unmasked_queue_entries():
    q, k, queue, ids, queue_ids = make_inputs(8, 64, 16)
    mixed = mix_logits(q, k, queue, temperature=0.1, n_hard=12, s1=4, s2=4, ids=ids, queue_ids=queue_ids)
    _, expected_hard = oracle_logits(q, k, queue, temperature=0.1, n_hard=12, ids=ids, queue_ids=queue_ids)
    assert torch.equal(mixed.hard_indices, expected_hard)
    assert mixed.hard_valid.all()


def test_column_layout_positive_queue_type1_type2():
    B, K, s1, s2, T = 4, 16, 3, 5, 0.5
    q, k, queue, *_ = make_inputs(B, K, 8)
    logits = mix_logits(q, k, queue, temperature=T, n_hard=4, s1=s1, s2=s2).logits
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / T)
    torch.testing.assert_close(logits[:, 1 : 1 + K], q @ queue.T / T)
    assert logits.shape[1] == 1 + K + s1 + s2


def test_own_key_in_the_queue_is_masked_and_never_mixed():
    B, K, d = 4, 32, 16
    q, k, queue, ids, _ = make_inputs(B, K, d, duplicates=False)
    queue_ids = torch.full((K,), -1)
    # Plant each query's own earlier key, identical to the query: unmasked, it would be hardest.
    queue[:B] = q
    queue_ids[:B] = ids
    mixed = mix_logits(q, k, queue, temperature=0.2, n_hard=6, s1=8, s2=8, ids=ids, queue_ids=queue_ids)
    logits = mixed.logits
    for b in range(B):
        assert logits[b, 1 + b] == float("-inf")
        assert b not in mixed.hard_indices[b].tolist()
    # Mixing the planted copy of q would push synthetic logits to about 1/T; none get there.
    assert (logits[:, 1 + K :] < 0.99 / 0.2).all()
    unmasked = mix_logits(q, k, queue, temperature=0.2, n_hard=6)
    assert [unmasked.hard_indices[b, 0].item() for b in range(B)] == list(range(B))


def test_too_few_unmasked_entries_give_minus_inf_synthetic_logits():
    B, K = 2, 6
    q, k, queue, _, _ = make_inputs(B, K, 8, duplicates=False)
    ids = torch.tensor([0, 1])
    queue_ids = torch.tensor([0, 0, 0, 0, 0, 1])  # query 0 has one unmasked entry, query 1 five
    mixed = mix_logits(q, k, queue, temperature=0.1, n_hard=3, s1=2, s2=2, ids=ids, queue_ids=queue_ids)
    type1, type2 = mixed.logits[:, 1 + K : 3 + K], mixed.logits[:, 3 + K :]
    assert torch.isinf(type1[0]).all() and torch.isfinite(type1[1]).all()
    assert torch.isfinite(type2).all()  # one hard negative is enough for type 2
    assert (mixed.hard_indices[0, 0] == 5) and mixed.hard_valid[0].tolist() == [True, False, False]
    loss = F.cross_entropy(mixed.logits, torch.zeros(B, dtype=torch.long))
    assert torch.isfinite(loss)


def test_type2_logits_lie_between_the_hard_negative_and_the_half_mix():
    q, k, queue, *_ = make_inputs(6, 32, 16)
    T = 0.1
    mixed = mix_logits(q, k, queue, temperature=T, n_hard=1, s2=50)
    n = queue[mixed.hard_indices[:, 0]]
    low = (q * n).sum(1, keepdim=True) / T
    high = (q * F.normalize(0.5 * q + 0.5 * n, dim=1)).sum(1, keepdim=True) / T
    type2 = mixed.logits[:, 1 + 32 :]
    assert (type2 >= low - 1e-5).all() and (type2 <= high + 1e-5).all()


def test_float32_logits_under_bf16_autocast_and_from_bf16_inputs():
    q, k, queue, ids, queue_ids = make_inputs(8, 64, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = mix_logits(q, k, queue, temperature=0.07, n_hard=8, s1=4, s2=4, ids=ids, queue_ids=queue_ids,
                            generator=torch.Generator().manual_seed(0)).logits
    expected, _ = oracle_logits(q, k, queue, temperature=0.07, n_hard=8, s1=4, s2=4, ids=ids, queue_ids=queue_ids,
                                generator=torch.Generator().manual_seed(0))
    assert logits.dtype == torch.float32
    assert relative_error(logits, expected) <= 1e-6


def test_a_seeded_generator_repeats_the_draws_exactly():
    q, k, queue, *_ = make_inputs(8, 64, 16)
    kwargs = dict(temperature=0.2, n_hard=16, s1=8, s2=8)
    first = mix_logits(q, k, queue, generator=torch.Generator().manual_seed(5), **kwargs).logits
    again = mix_logits(q, k, queue, generator=torch.Generator().manual_seed(5), **kwargs).logits
    other = mix_logits(q, k, queue, generator=torch.Generator().manual_seed(6), **kwargs).logits
    assert torch.equal(first, again)
    assert not torch.equal(first[:, 65:], other[:, 65:])


def test_gradient_reaches_only_q():
    q, k, queue, *_ = make_inputs(4, 16, 8)
    q.requires_grad_()
    k.requires_grad_()
    queue.requires_grad_()
    mix_logits(q, k, queue, temperature=0.2, n_hard=4, s1=3, s2=3).logits.sum().backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_draws_are_distinct_pairs_in_range_with_the_paper_distributions():
    n_valid = torch.tensor([2, 3, 10, 1000] * 500)
    draws = draw_mixing(n_valid, s1=64, s2=64, generator=torch.Generator().manual_seed(0))
    limit = n_valid.unsqueeze(1)
    assert (draws.pair_i != draws.pair_j).all()
    assert ((draws.pair_i >= 0) & (draws.pair_i < limit)).all()
    assert ((draws.pair_j >= 0) & (draws.pair_j < limit)).all()
    assert ((draws.single >= 0) & (draws.single < limit)).all()
    assert draws.alpha.min() >= 0 and draws.alpha.max() < 1
    assert draws.beta.min() >= 0 and draws.beta.max() < 0.5
    assert abs(draws.alpha.mean() - 0.5) < 0.01 and abs(draws.beta.mean() - 0.25) < 0.005
    # Uniform over the positions: for n_valid = 3 every position and every ordered pair is as likely.
    rows = n_valid == 3
    positions = torch.bincount(draws.single[rows].flatten(), minlength=3).float()
    assert (positions / positions.sum() - 1 / 3).abs().max() < 0.02
    pairs = torch.bincount((draws.pair_i[rows] * 3 + draws.pair_j[rows]).flatten(), minlength=9).float()
    assert pairs[[0, 4, 8]].sum() == 0
    assert (pairs[[1, 2, 3, 5, 6, 7]] / pairs.sum() - 1 / 6).abs().max() < 0.02


BAD_ARGUMENTS = [
    (dict(n_hard=17), "n_hard"),
    (dict(n_hard=1, s1=1), "n_hard"),
    (dict(n_hard=0, s2=1), "n_hard"),
    (dict(n_hard=-1), "n_hard"),
    (dict(n_hard=4, s1=-2), "s1"),
    (dict(n_hard=4, s2=-1), "s2"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.1), "temperature"),
]


@pytest.mark.parametrize("overrides,name", BAD_ARGUMENTS)
def test_bad_sizes_raise_value_error_naming_the_argument(overrides, name):
    q, k, queue, *_ = make_inputs(4, 16, 8)
    kwargs = dict(temperature=0.2) | overrides
    with pytest.raises(ValueError, match=name):
        mix_logits(q, k, queue, **kwargs)


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda q, k, queue, ids, qids: (q[0], k, queue, None, None), "q"),
        (lambda q, k, queue, ids, qids: (q, k[:2], queue, None, None), "k"),
        (lambda q, k, queue, ids, qids: (q, k, queue[:, :4], None, None), "queue"),
        (lambda q, k, queue, ids, qids: (q, k, queue, ids[:2], qids), "ids"),
        (lambda q, k, queue, ids, qids: (q, k, queue, ids, qids[:3]), "queue_ids"),
        (lambda q, k, queue, ids, qids: (q, k, queue, ids, None), "queue_ids"),
    ],
)
def test_mismatched_shapes_raise_value_error_naming_the_argument(change, name):
    q, k, queue, ids, queue_ids = change(*make_inputs(4, 16, 8))
    with pytest.raises(ValueError, match=name):
        mix_logits(q, k, queue, temperature=0.2, ids=ids, queue_ids=queue_ids)


def test_type1_logits_lie_on_the_arc_between_their_two_hard_negatives():
    q, k, queue, *_ = make_inputs(6, 32, 16)
    T = 0.1
    mixed = mix_logits(q, k, queue, temperature=T, n_hard=2, s1=50)  # every mix uses the same two
    n1, n2 = queue[mixed.hard_indices[:, 0]], queue[mixed.hard_indices[:, 1]]
    t = torch.linspace(0, 1, 2001).view(1, -1, 1)
    arc = F.normalize(t * n1.unsqueeze(1) + (1 - t) * n2.unsqueeze(1), dim=2)  # [B, 2001, d]
    on_arc = (arc @ q.unsqueeze(2)).squeeze(2) / T
    type1 = mixed.logits[:, 1 + 32 :]
    assert (type1 >= on_arc.min(1, keepdim=True).values - 1e-4).all()
    assert (type1 <= on_arc.max(1, keepdim=True).values + 1e-4).all()
