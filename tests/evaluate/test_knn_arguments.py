"""The weighted kNN probe's defaults (k = 200, temperature = 0.1) and its argument checks.

Banks are unit vectors at chosen angles, so every similarity is a cosine worked out by hand.
"""

import math
import re

import pytest
import torch

from hnmix.evaluate.probes import knn_accuracy, knn_scores


def at_degrees(*angles):
    """[n, 2] unit vectors at these angles in degrees: similarity to at_degrees(0) = cos(angle)."""
    radians = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1).float()


def vote(degrees, temperature=0.1):
    return math.exp(math.cos(math.radians(degrees)) / temperature)


def test_knn_takes_the_200_nearest_by_default():
    # 201 entries. Class 1: 99 at +5 degrees and one at 30; class 0: 99 at -5, one at 31 and the
    # 201st nearest at 32. Among the 200 nearest, class 1 leads by vote(30) - vote(31); the 201st
    # would add vote(32), more than that lead.
    bank = at_degrees(*[5] * 99, 30, *[-5] * 99, 31, 32)
    labels = torch.tensor([1] * 100 + [0] * 101)
    assert vote(31) + vote(32) > vote(30) > vote(31)
    query = at_degrees(0)
    scores = knn_scores(bank, labels, query, num_classes=2)
    torch.testing.assert_close(scores[0].double(), torch.tensor([99 * vote(5) + vote(31), 99 * vote(5) + vote(30)],
                                                               dtype=torch.float64), rtol=1e-5, atol=0)
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), num_classes=2)["knn_top1"] == 100.0
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), num_classes=2, k=201)["knn_top1"] == 0.0


def test_knn_weighs_votes_at_temperature_0_1_by_default():
    # Class 1 exactly at the query, class 0 twice at +-25 degrees: at 0.1 the exact match wins,
    # 2 exp(cos 25 / 0.1) < exp(1 / 0.1); a warmer temperature lets the two votes win.
    bank, labels, query = at_degrees(0, 25, -25), torch.tensor([1, 0, 0]), at_degrees(0)
    assert 2 * vote(25) < vote(0) and 2 * vote(25, 1.0) > vote(0, 1.0)
    scores = knn_scores(bank, labels, query, num_classes=2)
    torch.testing.assert_close(scores[0].double(), torch.tensor([2 * vote(25), vote(0)], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), num_classes=2)["knn_top1"] == 100.0
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), num_classes=2, temperature=1.0)["knn_top1"] == 0.0


def test_a_one_entry_bank_and_a_single_class_are_allowed():
    scores = knn_scores(at_degrees(10), torch.tensor([0]), at_degrees(0, 90), num_classes=1)
    torch.testing.assert_close(scores.double(), torch.tensor([[vote(10)], [vote(80)]], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    result = knn_accuracy(at_degrees(10), torch.tensor([0]), at_degrees(0, 90), torch.tensor([0, 0]), num_classes=1)
    assert result == {"knn_top1": 100.0, "knn_top5": 100.0}


BANK, LABELS, QUERIES = at_degrees(0, 10, 20, 30, 40), torch.tensor([0, 1, 0, 1, 1]), at_degrees(5, 15, 25)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"bank_features": torch.ones(5)}, "features must be [N, D] and [M, D], got (5,) and (3, 2)"),
        ({"query_features": torch.ones(3, 2, 1)}, "features must be [N, D] and [M, D], got (5, 2) and (3, 2, 1)"),
        ({"query_features": torch.ones(3, 3)}, "features must be [N, D] and [M, D], got (5, 2) and (3, 3)"),
        ({"bank_labels": torch.tensor([0, 1, 0, 1])}, "bank_labels must be [N=5], got (4,)"),
    ],
)
def test_misshapen_inputs_raise_exactly_this_message(change, message):
    arguments = {"bank_features": BANK, "bank_labels": LABELS, "query_features": QUERIES} | change
    with pytest.raises(ValueError) as raised:
        knn_scores(**arguments, num_classes=2)
    assert str(raised.value) == message


def test_an_empty_bank_raises_a_message_with_every_setting():
    with pytest.raises(ValueError) as raised:
        knn_scores(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), QUERIES, num_classes=2)
    assert str(raised.value) == ("need a non-empty bank, k >= 1, temperature > 0, chunk_size >= 1 and "
                                 "num_classes >= 1; got N=0, k=200, temperature=0.1, chunk_size=1024, num_classes=2")


@pytest.mark.parametrize(
    "setting",
    [{"k": 0}, {"temperature": 0.0}, {"temperature": -0.1}, {"chunk_size": 0}, {"num_classes": 0}],
)
def test_each_bad_setting_alone_raises(setting):
    arguments = {"num_classes": 2} | setting
    with pytest.raises(ValueError, match=r"^need a non-empty bank, k >= 1, temperature > 0"):
        knn_scores(BANK, LABELS, QUERIES, **arguments)


@pytest.mark.parametrize("labels", [[0, 1, 0, 1, -1], [0, 1, 0, 1, 2]])
def test_bank_labels_outside_the_classes_raise(labels):
    with pytest.raises(ValueError, match=re.escape("bank labels must lie in [0, 2), got")):
        knn_scores(BANK, torch.tensor(labels), QUERIES, num_classes=2)
