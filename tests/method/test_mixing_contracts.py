"""hnmix.mixing: what the docstrings promise beyond the logits' values, each checked on its own.

Masked logits are constants (no gradient reaches q through them), the outputs' dtypes and shapes
without hard negatives, the memory budget of the type-1 dot products and its chunks, the draws'
dtype, and the exact error messages.
"""

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_logits

from hnmix import mixing
from hnmix.mixing import draw_mixing, mix_logits


def unit_rows(n, d, generator):
    """[n, d] float32, L2-normalised rows."""
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1).float()


def inputs_with_masks(B=4, K=12, d=8):
    """q, k, queue and ids where all queue entries but the last (never written) are earlier keys
    of query 0: it has one unmasked entry, too few for type 1, enough for type 2."""
    g = torch.Generator().manual_seed(0)
    q, k, queue = unit_rows(B, d, g), unit_rows(B, d, g), unit_rows(K, d, g)
    return q, k, queue, torch.arange(B), torch.tensor([0] * (K - 1) + [-1])


def test_a_gradient_arriving_at_masked_logits_reaches_no_query():
    """Masked logits are constant -inf: whatever gradient a caller sends into them (here 1 into
    every logit) contributes nothing, as in the oracle where they are constants."""
    q, k, queue, ids, queue_ids = inputs_with_masks()
    kwargs = {"temperature": 0.2, "n_hard": 3, "s1": 3, "s2": 2, "ids": ids, "queue_ids": queue_ids}
    q_fast, q_oracle = q.clone().requires_grad_(), q.double().requires_grad_()
    fast = mix_logits(q_fast, k, queue, generator=torch.Generator().manual_seed(1), **kwargs).logits
    expected, _ = oracle_logits(q_oracle, k, queue, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.isinf(fast[:, 1:]).sum() == 11 + 3  # query 0's masked queue entries and its type 1
    (grad_fast,) = torch.autograd.grad(fast, q_fast, torch.ones_like(fast))
    (grad_oracle,) = torch.autograd.grad(expected, q_oracle, torch.ones_like(expected))
    torch.testing.assert_close(grad_fast.double(), grad_oracle, rtol=1e-5, atol=1e-5)


def test_without_hard_negatives_the_hard_sets_are_empty_int64_and_bool():
    q, k, queue, ids, queue_ids = inputs_with_masks()
    for mixed in (mix_logits(q, k, queue, temperature=0.2),  # n_hard defaults to 0
                  mix_logits(q, k, queue, temperature=0.2, n_hard=0, ids=ids, queue_ids=queue_ids)):
        assert mixed.hard_indices.shape == (4, 0) and mixed.hard_indices.dtype == torch.long
        assert mixed.hard_valid.shape == (4, 0) and mixed.hard_valid.dtype == torch.bool
        assert mixed.logits.shape == (4, 1 + 12)


def test_draws_are_float32_and_int64_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        draws = draw_mixing(torch.tensor([3, 5]), s1=2, s2=2, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(default)
    assert draws.alpha.dtype == draws.beta.dtype == torch.float32
    assert draws.pair_i.dtype == draws.pair_j.dtype == draws.single.dtype == torch.long


def test_type1_gather_buffer_budget_is_64_mib_on_cpu_and_128_mib_on_gpu():
    float32 = 4
    assert mixing._pair_chunk_elements(torch.device("cpu")) * float32 == 64 << 20
    assert mixing._pair_chunk_elements(torch.device("cuda")) * float32 == 128 << 20


@pytest.mark.parametrize(
    "budget_rows,chunk_rows",
    [(3, [3, 3, 2]), (1, [1] * 8), (0.5, [1] * 8)],  # less than a row still takes one row at a time
)
def test_type1_dot_products_are_gathered_into_one_reused_buffer_a_few_rows_at_a_time(
        monkeypatch, budget_rows, chunk_rows):
    B, K, s, d = 8, 20, 3, 4
    g = torch.Generator().manual_seed(2)
    queue = torch.randn(K, d, generator=g)
    pairs = torch.randint(0, K, (B, 2, s), generator=g)
    monkeypatch.setattr(mixing, "_pair_chunk_elements", lambda device: int(budget_rows * 2 * s * d))
    gathered = []
    index_select = torch.index_select

    def recording_index_select(source, dim, index, *, out):
        gathered.append((tuple(out.shape), out.data_ptr()))
        return index_select(source, dim, index, out=out)

    monkeypatch.setattr(torch, "index_select", recording_index_select)
    out = mixing._pair_dots(queue, pairs, out=torch.empty(B, s))
    monkeypatch.undo()
    assert [shape for shape, _ in gathered] == [(rows * 2 * s, d) for rows in chunk_rows]
    assert len({pointer for _, pointer in gathered}) == 1  # the same buffer every time
    expected = (queue[pairs[:, 0]].double() * queue[pairs[:, 1]].double()).sum(-1)
    torch.testing.assert_close(out.double(), expected)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"n_hard": -1}, "n_hard must be >= 0, got -1"),
        ({"n_hard": 4, "s1": -2}, "s1 must be >= 0, got -2"),
        ({"n_hard": 4, "s2": -1}, "s2 must be >= 0, got -1"),
    ],
)
def test_negative_sizes_raise_exactly_this_message(overrides, message):
    q, k, queue, *_ = inputs_with_masks()
    with pytest.raises(ValueError) as raised:
        mix_logits(q, k, queue, temperature=0.2, **overrides)
    assert str(raised.value) == message


def test_ids_without_queue_ids_raise_exactly_this_message():
    q, k, queue, ids, _ = inputs_with_masks()
    with pytest.raises(ValueError) as raised:
        mix_logits(q, k, queue, temperature=0.2, ids=ids)
    assert str(raised.value) == "ids and queue_ids must be given together (or neither)"
