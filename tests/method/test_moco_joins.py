"""The joins of `MoCo.forward`, each checked against an independent computation.

What goes into the queue (the key vectors of a separate key-encoder forward), what the mixing is
handed (the query and queue ids: a query's own earlier key is masked inside the model), that the
single-process split-BN path shuffles before encoding, and that the loss, its gradient and the
step statistics are those of the float64 oracle on separate forwards of copies of both encoders.

The encoder is a hand-made MLP with one BatchNorm1d (`TinyEncoder`), so that these run in
milliseconds and BatchNorm's batch statistics are the only coupling between the samples.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_logits
from torch import nn

from hnmix.moco import MoCo, mixing_generator

B, K, DIM, T = 8, 16, 8, 0.2


class TinyEncoder(nn.Module):
    """images [B, 3, 2, 2] -> Linear(12, 16) -> BatchNorm1d(16) -> ReLU -> Linear(16, DIM) -> L2-normalised [B, DIM]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, DIM))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(images), dim=1)


def tiny_images(n, seed):
    """[n, 3, 2, 2] float32."""
    return torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def tiny_moco(**overrides):
    """A MoCo on `TinyEncoder` whose query encoder no longer equals its key encoder (as after training).
    Options not given keep MoCo's defaults (seed 0, one direction, the curriculum from step 0)."""
    torch.manual_seed(0)
    options = {"dim_moco": DIM, "k_moco": K, "m_moco": 0.9, "t_moco": T, "n_hard": 4, "s1_hard": 3, "s2_hard": 3}
    moco = MoCo(TinyEncoder(), **options | overrides)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=noise))
    return moco


def fill_queue(moco, ids, labels):
    """Random unit keys; slots 0, 2, 4 hold earlier keys of queries 0, 1, 2 (their ids and labels),
    slots 1, 3 keys of other images of the queries' classes, the last four slots were never written."""
    g = torch.Generator().manual_seed(2)
    moco.queue.keys.copy_(F.normalize(torch.randn(K, DIM, generator=g), dim=1))
    queue_ids = torch.arange(K) + 100
    queue_labels = torch.arange(K) % 5
    queue_ids[[0, 2, 4]], queue_labels[[0, 2, 4]] = ids[:3], labels[:3]
    queue_labels[[1, 3]] = labels[3:5]
    queue_ids[-4:], queue_labels[-4:] = -1, -1
    moco.queue.ids.copy_(queue_ids)
    moco.queue.labels.copy_(queue_labels)


IDS = torch.arange(B) + 10  # dataset indices, different from the labels
LABELS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_enqueues_the_key_encoders_normalised_keys_of_view_k(symmetric):
    moco = tiny_moco(**({"symmetric": True} if symmetric else {}))
    view_q, view_k = tiny_images(B, 1), tiny_images(B, 2)
    key_encoder = copy.deepcopy(moco.encoder_k)  # train mode: BN normalises with the batch's statistics
    with torch.no_grad():
        expected = F.normalize(key_encoder.net(view_k), dim=1)
        # The check discriminates: the other view, or the query encoder, give other vectors.
        assert (expected - F.normalize(key_encoder.net(view_q), dim=1)).abs().max() > 0.1
        assert (expected - copy.deepcopy(moco.encoder_q)(view_k)).abs().max() > 0.1
    keys_before = moco.queue.keys.clone()
    moco(view_q, view_k, IDS, LABELS)
    torch.testing.assert_close(moco.queue.keys[:B], expected)
    assert torch.equal(moco.queue.keys[B:], keys_before[B:])
    assert torch.equal(moco.queue.ids[:B], IDS) and torch.equal(moco.queue.labels[:B], LABELS)
    assert moco.queue.ptr.item() == B


def _oracle_direction(query_encoder, key_encoder, view_q, view_k, queue_keys, queue_ids, queue_labels, *,
                      n_hard, s1, s2, generator):
    """(loss, statistics) of one direction, float64, from separate forwards of copies of the encoders."""
    q = query_encoder(view_q.double())
    with torch.no_grad():
        k = key_encoder(view_k.double())
    logits, hard = oracle_logits(q, k, queue_keys, temperature=T, n_hard=n_hard, s1=s1, s2=s2, ids=IDS,
                                 queue_ids=queue_ids, generator=generator)
    loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
    logits = logits.detach()
    pos, hardest = logits[:, 0], logits[:, 1 : 1 + K].max(1).values
    stats = {"acc1": (pos > hardest).double().mean(), "logit_pos": pos.mean(), "logit_hardest": hardest.mean()}
    for name, block in (("logit_type1", logits[:, 1 + K : 1 + K + s1]), ("logit_type2", logits[:, 1 + K + s1 :])):
        if block.numel():
            stats[name] = block[torch.isfinite(block)].mean()
    synthetic = logits[:, 1 + K :]
    if synthetic.numel():
        finite = torch.isfinite(synthetic)
        stats["synthetic_above_pos"] = ((synthetic > pos[:, None]) & finite).sum().double() / finite.sum()
    same = known = 0
    for b in range(B):
        for j in hard[b].tolist():
            if j >= 0 and queue_labels[j] >= 0:
                known += 1
                same += int(queue_labels[j] == LABELS[b])
    stats["hard_false_negative"] = torch.tensor(same / known, dtype=torch.float64)
    return loss, stats


@pytest.mark.parametrize(
    "options",
    [{}, {"symmetric": True}, {"start1_hard": 10}],  # start1_hard=10: at step 5 only type 2 is active
)
def test_forward_loss_gradient_and_statistics_match_the_float64_oracle(options):
    moco = tiny_moco(**options)
    symmetric = options.get("symmetric", False)
    fill_queue(moco, IDS, LABELS)
    step = 5
    s1, s2 = (0 if step < options.get("start1_hard", 0) else 3), 3
    view_q, view_k = tiny_images(B, 1), tiny_images(B, 2)
    query_encoder, key_encoder = copy.deepcopy(moco.encoder_q).double(), copy.deepcopy(moco.encoder_k).double()
    queue = (moco.queue.keys.double(), moco.queue.ids.clone(), moco.queue.labels.clone())

    loss, stats = moco(view_q, view_k, IDS, LABELS, step=step)
    loss.backward()

    # MoCo's default seed 0, and one process is rank 0. Both directions draw from the same
    # generator, one after the other.
    generator = mixing_generator(0, step, 0, torch.device("cpu"))
    mix = {"n_hard": 4, "s1": s1, "s2": s2, "generator": generator}
    expected_loss, expected = _oracle_direction(query_encoder, key_encoder, view_q, view_k, *queue, **mix)
    if symmetric:
        loss_back, stats_back = _oracle_direction(query_encoder, key_encoder, view_k, view_q, *queue, **mix)
        expected_loss = (expected_loss + loss_back) / 2
        expected = {name: (value + stats_back[name]) / 2 for name, value in expected.items()}
    expected_loss.backward()

    torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=1e-5, atol=0)
    assert set(stats) == set(expected) | {"loss"}
    assert stats["loss"] == loss.detach()
    for name, value in expected.items():
        torch.testing.assert_close(stats[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), p_oracle in zip(moco.encoder_q.named_parameters(), query_encoder.parameters()):
        torch.testing.assert_close(p.grad.double(), p_oracle.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_masks_each_querys_own_earlier_key_in_the_queue():
    moco = tiny_moco(s1_hard=0, s2_hard=0)
    view_q, view_k = tiny_images(B, 1), tiny_images(B, 2)
    with torch.no_grad():
        q = copy.deepcopy(moco.encoder_q)(view_q)  # the queries the model will compute (BN: same batch)
    # Slot b holds query b's own earlier key, planted equal to q[b]: unmasked, it would score 1/T,
    # the highest any unit vector can. The other slots hold keys of other images (ids >= 100).
    g = torch.Generator().manual_seed(4)
    queue_keys = F.normalize(torch.randn(K, DIM, generator=g), dim=1)
    queue_keys[:B] = q
    moco.queue.keys.copy_(queue_keys)
    moco.queue.ids.copy_(torch.cat([IDS, torch.arange(K - B) + 100]))
    moco.queue.labels.copy_(torch.arange(K) % 5)
    with torch.no_grad():
        _, stats = moco(view_q, view_k, IDS, LABELS)
    logits = q @ queue_keys.T / T  # [B, K]
    others = logits.masked_fill(torch.eye(B, K, dtype=torch.bool), float("-inf"))  # all but its own slot
    torch.testing.assert_close(stats["logit_hardest"], others.max(1).values.mean())
    unmasked = logits.max(1).values.mean()
    torch.testing.assert_close(unmasked, torch.tensor(1 / T))
    assert stats["logit_hardest"] < unmasked - 0.5


def test_forward_masked_own_keys_are_never_counted_as_hard_false_negatives():
    """Query b's own earlier key (slot b, its label) would be its hardest negative and a false
    negative; masked, only the other slots' classes count, and none shares a query's class."""
    moco = tiny_moco(n_hard=2, s1_hard=0, s2_hard=0)
    view_q, view_k = tiny_images(B, 1), tiny_images(B, 2)
    with torch.no_grad():
        q = copy.deepcopy(moco.encoder_q)(view_q)
    queue_keys = F.normalize(torch.randn(K, DIM, generator=torch.Generator().manual_seed(5)), dim=1)
    queue_keys[:B] = q
    moco.queue.keys.copy_(queue_keys)
    moco.queue.ids.copy_(torch.cat([IDS, torch.arange(K - B) + 100]))
    labels = torch.arange(B)  # one class per query
    moco.queue.labels.copy_(torch.cat([labels, torch.full((K - B,), 9)]))
    with torch.no_grad():
        _, stats = moco(view_q, view_k, IDS, labels)
    assert stats["hard_false_negative"] == 0.0


def _partition_keys(encoder, view_k, group):
    """Keys [B, DIM] when the samples in `group` are normalised together and the others together."""
    rest = [i for i in range(B) if i not in group]
    keys = torch.empty(B, DIM)
    with torch.no_grad():
        keys[list(group)] = copy.deepcopy(encoder)(view_k[list(group)])
        keys[rest] = copy.deepcopy(encoder)(view_k[rest])
    return keys


def test_single_process_split_bn_encodes_the_keys_on_a_shuffled_batch():
    """With bn_splits=2 each half of the batch is normalised on its own; the keys must be those of
    some split of the shuffled batch into halves, each sample's own, and not always the unshuffled
    halves (0..3 and 4..7): the key encoder runs in train mode, so the grouping shows in the keys."""
    torch.manual_seed(0)
    plain = TinyEncoder()  # the encoder before MoCo turns its BatchNorm into a split one
    moco = MoCo(copy.deepcopy(plain), dim_moco=DIM, k_moco=K, m_moco=0.9, t_moco=T, bn_splits=2)
    assert moco.encoder_k.training
    view_k = tiny_images(B, 6)
    halves = [(0, *rest) for rest in itertools.combinations(range(1, B), B // 2 - 1)]
    candidates = {group: _partition_keys(plain, view_k, group) for group in halves}
    found = []
    for seed in range(4):
        torch.manual_seed(seed)
        local, global_keys = moco.encode_keys(view_k)
        assert global_keys is local
        matches = [g for g, keys in candidates.items() if torch.allclose(local, keys, rtol=0, atol=1e-5)]
        assert len(matches) == 1, f"seed {seed}: the keys are no split of the batch into halves"
        found.append(matches[0])
    assert any(group != (0, 1, 2, 3) for group in found)
    assert len(set(found)) > 1  # a new shuffle every call


def test_without_split_bn_one_process_encodes_the_batch_in_order():
    """bn_splits=1 on one process: no shuffle (nothing to gain), the keys are the key encoder's on
    the batch as it is, bit for bit, and the global RNG is not drawn from."""
    moco = tiny_moco()
    view_k = tiny_images(B, 6)
    with torch.no_grad():
        expected = copy.deepcopy(moco.encoder_k)(view_k)
    rng = torch.get_rng_state()
    local, global_keys = moco.encode_keys(view_k)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(local, expected) and torch.equal(global_keys, expected)


def test_moco_defaults_to_plain_moco_without_hard_negatives():
    torch.manual_seed(0)
    moco = MoCo(TinyEncoder(), dim_moco=DIM, k_moco=K, m_moco=0.9, t_moco=T)
    _, stats = moco(tiny_images(B, 1), tiny_images(B, 2), IDS, LABELS)
    assert set(stats) == {"acc1", "logit_pos", "logit_hardest", "loss"}  # n_hard=0: no false-negative statistic


def test_the_curriculum_starts_at_step_zero_unless_told_and_forward_defaults_to_step_zero():
    assert tiny_moco().mixing_sizes(0) == (3, 3)
    late = tiny_moco(start1_hard=1, start2_hard=1)
    with torch.no_grad():
        _, stats = late(tiny_images(B, 1), tiny_images(B, 2), IDS)  # no step given: step 0, before both starts
    assert "logit_type1" not in stats and "logit_type2" not in stats


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_zero_copies_the_query_encoder_and_one_freezes_the_key_encoder(m):
    moco = tiny_moco(m_moco=m)
    before = [p.clone() for p in moco.encoder_k.parameters()]
    moco.momentum_update()
    expected = list(moco.encoder_q.parameters()) if m == 0.0 else before
    for p_k, p_expected in zip(moco.encoder_k.parameters(), expected):
        assert torch.equal(p_k, p_expected)
