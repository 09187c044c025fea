"""Top-5 accuracy when a dataset has five classes or fewer: it is top-C, so every query is right.

`top_k_accuracy`, the kNN probe and the linear probe, on scores and features worked out by hand.
"""

import math

import pytest
import torch

from hnmix.evaluate.probes import knn_accuracy, top_k_accuracy, train_linear_probe


def ranked_scores(ranks, num_classes):
    """[len(ranks), C] scores where the query's label (class 0) is ranked ranks[i] (1 = best)."""
    scores = torch.zeros(len(ranks), num_classes)
    for i, rank in enumerate(ranks):
        order = [c for c in range(1, num_classes)]
        order.insert(rank - 1, 0)  # classes from best to worst
        for position, c in enumerate(order):
            scores[i, c] = num_classes - position
    return scores


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5])
def test_with_five_classes_or_fewer_every_label_is_in_the_top5(num_classes):
    ranks = list(range(1, num_classes + 1))  # one query per possible rank of its label
    top1, top5 = top_k_accuracy(ranked_scores(ranks, num_classes), torch.zeros(num_classes, dtype=torch.long))
    assert top1 == 100.0 / num_classes
    assert top5 == 100.0


def test_with_six_classes_the_sixth_ranked_label_misses_the_top5():
    top1, top5 = top_k_accuracy(ranked_scores([1, 5, 6, 6], 6), torch.zeros(4, dtype=torch.long))
    assert (top1, top5) == (25.0, 50.0)


def test_no_queries_is_an_error_with_this_message():
    with pytest.raises(ValueError) as raised:
        top_k_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert str(raised.value) == "no queries to score"


def at_degrees(*angles):
    """[n, 2] unit vectors at these angles in degrees."""
    radians = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1).float()


def test_knn_top5_with_three_classes_is_every_query_even_the_missed_ones():
    # Classes at 0, 120 and 240 degrees; every query sits at class 0 but half are labelled otherwise.
    bank = at_degrees(0, 120, 240)
    queries = at_degrees(1, -1, 2, -2)
    result = knn_accuracy(bank, torch.arange(3), queries, torch.tensor([0, 0, 1, 2]), num_classes=3, k=3)
    assert result == {"knn_top1": 50.0, "knn_top5": 100.0}


def test_linear_probe_top5_with_two_classes_is_every_query():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 4, generator=g)
    labels = torch.randint(0, 2, (40,), generator=g)  # random labels: top-1 is near chance
    result = train_linear_probe(features[:20], labels[:20], features[20:30], labels[20:30], features[30:],
                                labels[30:], num_classes=2, lrs=(0.01,), weight_decays=(0.0,), epochs=1,
                                batch_size=8)
    assert result["linear_top1"] < 100.0
    assert result["linear_top5"] == 100.0
