"""hnmix.evaluate.hardness: each analysis number against a direct, materialising float64 computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method.test_negative_types import EXTRAPOLATION
from oracle import oracle_logits

from hnmix.evaluate.hardness import (
    alignment,
    false_negative_fraction,
    logit_groups,
    logit_histograms,
    synthetic_harder_than_hardest,
    top_n_grid,
    uniformity,
)
from hnmix.mixing import NEGATIVE_TYPES, mix_logits, register_negative_type

B, K, D, N_HARD, S1, S2, T = 6, 20, 8, 5, 4, 3, 0.2
SIZES = {"s1": S1, "s2": S2}


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def batch():
    """Queries, keys and a queue where query b's own image sits in the queue at slot b."""
    q, k, queue = unit(B, D, seed=1), unit(B, D, seed=2), unit(K, D, seed=3)
    ids = torch.arange(100, 100 + B)
    queue_ids = torch.arange(K)
    queue_ids[:B] = ids
    labels = torch.tensor([0, 1, 2, 0, 1, -1])
    queue_labels = torch.randint(0, 3, (K,), generator=torch.Generator().manual_seed(4))
    queue_labels[[3, 7]] = -1
    return q, k, queue, ids, queue_ids, labels, queue_labels


def mixed_of(batch):
    q, k, queue, ids, queue_ids, *_ = batch
    return mix_logits(q, k, queue, temperature=T, n_hard=N_HARD, ids=ids, queue_ids=queue_ids,
                      generator=torch.Generator().manual_seed(5), **SIZES)


def test_logit_groups_are_the_oracles_logits_by_kind(batch):
    q, k, queue, ids, queue_ids, *_ = batch
    groups = logit_groups(mixed_of(batch), queue_size=K, sizes=SIZES)
    logits, hard = oracle_logits(q, k, queue, temperature=T, n_hard=N_HARD, s1=S1, s2=S2, ids=ids,
                                 queue_ids=queue_ids, generator=torch.Generator().manual_seed(5))
    masked = ids.unsqueeze(1) == queue_ids.unsqueeze(0)
    expected = {
        "positive": [logits[b, 0] for b in range(B)],
        "queue": [logits[b, 1 + j] for b in range(B) for j in range(K) if not masked[b, j]],
        "hard": [logits[b, 1 + j] for b in range(B) for j in hard[b].tolist() if j >= 0],
        "type1": [logits[b, 1 + K + t] for b in range(B) for t in range(S1)],
        "type2": [logits[b, 1 + K + S1 + t] for b in range(B) for t in range(S2)],
    }
    assert len(groups["queue"]) == B * (K - 1)  # each query's own image is no negative
    for name, values in expected.items():
        torch.testing.assert_close(groups[name].double().sort().values, torch.stack(values).sort().values,
                                   rtol=0, atol=1e-5)


def test_histograms_count_like_numpy_on_shared_edges():
    groups = {"a": torch.tensor([0.0, 0.5, 1.0, 1.0, 3.0]), "b": torch.tensor([2.0, 2.9999, -1.0]),
              "empty": torch.zeros(0)}
    histograms = logit_histograms(groups, bins=8)
    edges = np.linspace(-1.0, 3.0, 9)
    np.testing.assert_allclose(histograms["edges"], edges)
    for name, values in groups.items():
        counts, _ = np.histogram(values.numpy().astype(np.float64), bins=edges)
        assert histograms[name] == counts.tolist(), name
    assert sum(histograms["a"]) == 5 and sum(histograms["empty"]) == 0


def test_false_negative_fraction_counts_same_class_among_the_n_hardest_known(batch):
    q, _, queue, ids, queue_ids, labels, queue_labels = batch
    neg = (q.double() @ queue.double().T).masked_fill(ids.unsqueeze(1) == queue_ids.unsqueeze(0), float("-inf"))
    ns = [1, 2, 5, K - 1]
    got = false_negative_fraction(neg, labels, queue_labels, ns)
    for n, value in zip(ns, got):
        same = known = 0
        for b in range(B):
            allowed = sorted((j for j in range(K) if math.isfinite(neg[b, j])), key=lambda j: -neg[b, j].item())
            for j in allowed[:n]:
                if labels[b] >= 0 and queue_labels[j] >= 0:
                    known += 1
                    same += int(labels[b] == queue_labels[j])
        assert value == pytest.approx(same / known, abs=1e-12), n
    assert math.isnan(false_negative_fraction(neg[5:], labels[5:], queue_labels, [3])[0])  # query of unknown class
    with pytest.raises(ValueError, match="top-N"):
        false_negative_fraction(neg, labels, queue_labels, [K + 1])


def test_synthetic_harder_than_hardest_compares_with_each_rows_best_real_negative(batch):
    logits = mixed_of(batch).logits.double()
    got = synthetic_harder_than_hardest(logits, queue_size=K, sizes=SIZES)
    for name, columns in (("type1", range(S1)), ("type2", range(S1, S1 + S2)), ("all", range(S1 + S2))):
        above = total = 0
        for b in range(B):
            hardest = max(logits[b, 1 + j].item() for j in range(K))
            for t in columns:
                value = logits[b, 1 + K + t].item()
                if math.isfinite(value):
                    total += 1
                    above += value > hardest
        assert got[name] == pytest.approx(above / total, abs=1e-12), name
    assert 0 < got["type2"] <= 1  # a query mixed into a hard negative often beats every real one
    assert math.isnan(synthetic_harder_than_hardest(logits[:, : 1 + K], queue_size=K, sizes={})["all"])


@pytest.fixture
def extrapolation():
    register_negative_type(EXTRAPOLATION)
    yield EXTRAPOLATION
    del NEGATIVE_TYPES[EXTRAPOLATION.name]


def test_a_registered_type_has_its_own_group_and_fraction_after_type2s(batch, extrapolation):
    q, k, queue, ids, queue_ids, *_ = batch
    sizes = SIZES | {"s3": 2}
    mixed = mix_logits(q, k, queue, temperature=T, n_hard=N_HARD, ids=ids, queue_ids=queue_ids, **sizes)
    groups, logits = logit_groups(mixed, queue_size=K, sizes=sizes), mixed.logits
    harder = synthetic_harder_than_hardest(logits, queue_size=K, sizes=sizes)
    assert list(groups) == ["positive", "queue", "hard", "type1", "type2", "extrapolation"]
    assert list(harder) == ["type1", "type2", "extrapolation", "all"]
    type2, third = logits[:, 1 + K + S1 : 1 + K + S1 + S2], logits[:, 1 + K + S1 + S2 :]
    assert third.shape == (B, 2) and torch.isfinite(third).all()
    assert torch.equal(groups["type2"], type2.flatten()) and torch.equal(groups["extrapolation"], third.flatten())
    hardest = logits[:, 1 : 1 + K].max(dim=1, keepdim=True).values
    assert harder["extrapolation"] == pytest.approx((third > hardest).double().mean().item(), abs=1e-12)


def test_alignment_and_uniformity_are_wang_and_isolas_definitions():
    z1, z2 = unit(7, 5, seed=6), unit(7, 5, seed=7)
    direct_alignment = sum(((z1[i].double() - z2[i].double()).norm() ** 2).item() for i in range(7)) / 7
    assert alignment(z1, z2) == pytest.approx(direct_alignment, rel=1e-12)
    pairs = [(i, j) for i in range(7) for j in range(i + 1, 7)]
    direct_uniformity = math.log(sum(math.exp(-2 * ((z1[i].double() - z1[j].double()).norm() ** 2).item())
                                     for i, j in pairs) / len(pairs))
    assert uniformity(z1) == pytest.approx(direct_uniformity, rel=1e-12)
    assert alignment(z1, z1) == 0.0
    assert uniformity(unit(1, 5, seed=8).expand(4, 5)) == pytest.approx(0.0)  # collapsed: the worst value


def test_top_n_grid_holds_powers_of_two_k_and_n_hard():
    assert top_n_grid(64, 10) == [1, 2, 4, 8, 10, 16, 32, 64]
    assert top_n_grid(48, 0) == [1, 2, 4, 8, 16, 32, 48]
