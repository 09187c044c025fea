"""hnmix.moco.step_statistics on logits worked out by hand: the numerators and the denominators.

The logits of a query are [positive, K queue entries, s1 type-1, s2 type-2], already divided by
the temperature; -inf marks what was masked (a query's own earlier key, a synthetic negative its
query had too few hard negatives for).
"""

import torch

from hnmix.mixing import MixedLogits
from hnmix.moco import step_statistics

INF = float("inf")


def mixed(logits, hard_indices=None, hard_valid=None):
    """MixedLogits of `logits` [B, ...] with the hard negatives given, or none (n_hard = 0)."""
    logits = torch.tensor(logits)
    if hard_indices is None:
        return MixedLogits(logits, torch.zeros(len(logits), 0, dtype=torch.long),
                           torch.zeros(len(logits), 0, dtype=torch.bool))
    return MixedLogits(logits, torch.tensor(hard_indices), torch.tensor(hard_valid))


# Three queries, K = 2, s1 = 2, s2 = 1. Query 0 had fewer than two hard negatives: no type 1.
SYNTHETIC_CASE = mixed([
    # pos  queue       type 1      type 2
    [2.0, 1.0, 0.5, -INF, -INF, 3.0],
    [1.0, 3.0, 1.0, 0.0, 4.0, 0.5],
    [2.0, 2.0, 0.0, 1.0, 1.0, 2.0],  # ties: positive = hardest queue logit = the type-2 logit
])


def test_accuracy_and_mean_logits_by_hand():
    stats = step_statistics(SYNTHETIC_CASE, queue_size=2, s1=2, s2=1)
    torch.testing.assert_close(stats["acc1"], torch.tensor(1 / 3))  # 2 > 1; 1 < 3; a tie 2 = 2 is no hit
    torch.testing.assert_close(stats["logit_pos"], torch.tensor(5 / 3))
    torch.testing.assert_close(stats["logit_hardest"], torch.tensor(2.0))  # (1 + 3 + 2) / 3


def test_synthetic_means_and_fraction_above_the_positive_count_only_unmasked_negatives():
    stats = step_statistics(SYNTHETIC_CASE, queue_size=2, s1=2, s2=1)
    torch.testing.assert_close(stats["logit_type1"], torch.tensor(1.5))  # (0 + 4 + 1 + 1) / 4 unmasked
    torch.testing.assert_close(stats["logit_type2"], torch.tensor(5.5 / 3))  # (3 + 0.5 + 2) / 3
    # 7 unmasked synthetic logits; above their positive: 3 > 2 (query 0), 4 > 1 (query 1). 2 = 2 is not above.
    torch.testing.assert_close(stats["synthetic_above_pos"], torch.tensor(2 / 7))


def test_a_type_no_query_could_mix_reports_zero_not_nan():
    case = mixed([[1.0, 0.5, -INF, -INF, 2.0], [1.0, 0.0, -INF, -INF, 0.0]])  # K = 1, s1 = 2 all masked, s2 = 1
    stats = step_statistics(case, queue_size=1, s1=2, s2=1)
    assert stats["logit_type1"] == 0.0
    torch.testing.assert_close(stats["logit_type2"], torch.tensor(1.0))
    assert stats["synthetic_above_pos"] == 0.5  # 2 > 1 of the two unmasked
    everything_masked = mixed([[1.0, 0.5, -INF, -INF, -INF]])
    stats = step_statistics(everything_masked, queue_size=1, s1=2, s2=1)
    assert stats["logit_type1"] == 0.0 and stats["logit_type2"] == 0.0 and stats["synthetic_above_pos"] == 0.0


def test_statistics_of_the_inactive_parts_are_left_out():
    plain = mixed([[2.0, 1.0, 0.5], [1.0, 3.0, 1.0]])
    stats = step_statistics(plain, queue_size=2, s1=0, s2=0, labels=torch.tensor([0, 1]),
                            queue_labels=torch.tensor([0, 1]))
    assert set(stats) == {"acc1", "logit_pos", "logit_hardest"}  # no synthetic logits, no hard negatives
    only_type2 = mixed([[2.0, 1.0, 0.5, 3.0]])
    assert set(step_statistics(only_type2, queue_size=2, s1=0, s2=1)) == {
        "acc1", "logit_pos", "logit_hardest", "logit_type2", "synthetic_above_pos"}
    only_type1 = mixed([[2.0, 1.0, 0.5, 3.0]])
    assert "logit_type2" not in step_statistics(only_type1, queue_size=2, s1=1, s2=0)


def test_all_statistics_are_float32_scalars_whatever_the_logits_dtype():
    case = SYNTHETIC_CASE._replace(logits=SYNTHETIC_CASE.logits.double())
    stats = step_statistics(case, queue_size=2, s1=2, s2=1)
    assert len(stats) == 6
    assert all(value.dtype == torch.float32 and value.dim() == 0 for value in stats.values())


# K = 6 queue slots: classes 2, 2, never written (-1), 5, 5, 2. Three queries with n_hard = 3 each.
QUEUE_LABELS = torch.tensor([2, 2, -1, 5, 5, 2])
HARD_CASE = mixed(
    [[1.0] + [0.0] * 6] * 3,
    hard_indices=[[0, 2, 5], [3, 0, 4], [1, 3, 2]],
    # Query 0 had only two unmasked entries: its third "hard negative" (slot 5) is a masked one.
    hard_valid=[[True, True, False], [True, True, True], [True, True, True]],
)


def test_hard_false_negatives_over_known_classes_of_valid_hard_negatives_by_hand():
    stats = step_statistics(HARD_CASE, queue_size=6, s1=0, s2=0, labels=torch.tensor([2, 5, -1]),
                            queue_labels=QUEUE_LABELS)
    # Query 0 (class 2): slot 0 known and same; slot 2 never written; slot 5 masked (same class,
    #   but not a hard negative). Query 1 (class 5): slots 3 and 4 same, slot 0 known and other.
    # Query 2 (class unknown): nothing known. Same class 1 + 2 = 3 of 1 + 3 = 4 known pairs.
    assert stats["hard_false_negative"] == 0.75


def test_hard_false_negatives_with_nothing_known_are_zero_not_nan():
    unknown = torch.full((6,), -1)  # an unfilled queue
    stats = step_statistics(HARD_CASE, queue_size=6, s1=0, s2=0, labels=torch.tensor([2, 5, -1]),
                            queue_labels=unknown)
    assert stats["hard_false_negative"] == 0.0
    stats = step_statistics(HARD_CASE, queue_size=6, s1=0, s2=0, labels=torch.full((3,), -1),
                            queue_labels=QUEUE_LABELS)  # a dataset without labels
    assert stats["hard_false_negative"] == 0.0


def test_hard_false_negatives_need_both_label_sets():
    for labels, queue_labels in ((None, QUEUE_LABELS), (torch.tensor([2, 5, -1]), None)):
        stats = step_statistics(HARD_CASE, queue_size=6, s1=0, s2=0, labels=labels, queue_labels=queue_labels)
        assert "hard_false_negative" not in stats
