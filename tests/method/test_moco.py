"""hnmix.moco on one process: encoders, queue, split BN, curriculum, statistics, state round trip."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from hnmix.mixing import MixedLogits
from hnmix.distributed import exchange_dtype
from hnmix.moco import MoCo, MoCoEncoder, step_statistics
from hnmix.key_queue import KeyQueue
from hnmix.split_bn import convert_split_batchnorm

IMAGE = 32


def images(n, seed):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def small_moco(arch="test_resnet", **overrides):
    torch.manual_seed(0)
    options = dict(dim_moco=16, k_moco=32, m_moco=0.9, t_moco=0.2, n_hard=8, s1_hard=4, s2_hard=4) | overrides
    return MoCo(MoCoEncoder(arch, options["dim_moco"]), **options)


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("resnet18", {}),  # head called `fc`
        ("vit_tiny_patch16_224", dict(img_size=IMAGE, patch_size=8)),  # head called `head`
        ("mobilenetv3_small_050", {}),  # head called `classifier`, BatchNormAct2d layers
        ("test_mambaout", {}),  # head_hidden_size != num_features
    ],
)
def test_encoder_replaces_every_timm_classifier_with_the_projection_mlp(arch, kwargs):
    encoder = MoCoEncoder(arch, 24, **kwargs)
    width = encoder.backbone(images(2, 0)).shape[1]
    assert encoder.backbone.num_classes == 0
    assert [type(m) for m in encoder.head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert encoder.head[0].in_features == width and encoder.head[2].out_features == 24
    out = encoder.eval()(images(2, 0))
    assert out.shape == (2, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_key_encoder_is_a_frozen_copy_updated_by_ema_once_per_call():
    moco = small_moco(m_moco=0.75)
    assert all(not p.requires_grad for p in moco.encoder_k.parameters())
    for p_q, p_k in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.equal(p_q, p_k)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.encoder_k.parameters()]
    moco.momentum_update()
    for old, p_q, p_k in zip(before, moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        torch.testing.assert_close(p_k, 0.75 * old + 0.25 * p_q)


def test_momentum_update_applies_only_where_told_and_otherwise_as_without_the_flag():
    moco, plain = small_moco(m_moco=0.75), small_moco(m_moco=0.75)
    for model in (moco, plain):
        with torch.no_grad():
            for p in model.encoder_q.parameters():
                p.add_(1.0)
    before = copy.deepcopy(moco.encoder_k.state_dict())
    moco.momentum_update(torch.tensor(False))
    for name, value in moco.encoder_k.state_dict().items():
        assert torch.equal(value, before[name]), name
    moco.momentum_update(torch.tensor(True))
    plain.momentum_update()
    for name, value in moco.encoder_k.state_dict().items():
        assert torch.equal(value, plain.encoder_k.state_dict()[name]), name  # bit-identical
    assert not torch.equal(moco.encoder_k.head[0].weight, before["head.0.weight"])


def test_momentum_update_takes_a_scheduled_momentum_for_this_step():
    moco = small_moco(m_moco=0.75)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.encoder_k.parameters()]
    moco.momentum_update(torch.tensor(True), momentum=0.5)
    for old, p_q, p_k in zip(before, moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        torch.testing.assert_close(p_k, 0.5 * old + 0.5 * p_q)


def test_symmetric_loss_is_the_mean_of_both_directions_and_enqueues_each_image_once():
    plain = dict(n_hard=0, s1_hard=0, s2_hard=0)
    symmetric = small_moco(symmetric=True, **plain)
    forward, backward = small_moco(**plain), small_moco(**plain)  # the same initial weights
    x1, x2, ids = images(4, 1), images(4, 2), torch.arange(4)
    loss, stats = symmetric(x1, x2, ids)
    loss_forward, stats_forward = forward(x1, x2, ids)
    loss_backward, stats_backward = backward(x2, x1, ids)
    torch.testing.assert_close(loss, (loss_forward + loss_backward) / 2)
    torch.testing.assert_close(stats["acc1"], (stats_forward["acc1"] + stats_backward["acc1"]) / 2)
    # One enqueue of the batch, with the keys of view_k (those `forward` enqueued too).
    assert symmetric.queue.ptr.item() == 4
    torch.testing.assert_close(symmetric.queue.keys, forward.queue.keys)
    loss.backward()
    assert all(p.grad is not None for p in symmetric.encoder_q.parameters())


def test_mixing_draws_are_a_function_of_seed_and_step():
    """The same step of two models with the same seed draws the same mixes (a resumed run), another
    step or seed draws others; the global RNG plays no part."""
    x1, x2, ids = images(4, 1), images(4, 2), torch.arange(4)

    def type1_logit(seed, step):
        moco = small_moco(seed=seed)
        moco.queue.keys.copy_(F.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(3)), dim=1))
        torch.manual_seed(step + 100 * seed)  # a different global RNG every call
        with torch.no_grad():
            return moco(x1, x2, ids, step=step)[1]["logit_type1"].item()

    assert type1_logit(seed=1, step=5) == type1_logit(seed=1, step=5)
    assert type1_logit(seed=1, step=5) != type1_logit(seed=1, step=6)
    assert type1_logit(seed=1, step=5) != type1_logit(seed=2, step=5)


def test_images_cross_ranks_in_the_autocast_dtype_else_their_own():
    x = images(2, 0)
    assert exchange_dtype(x) == torch.float32 and exchange_dtype(x.double()) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert exchange_dtype(x) == torch.bfloat16
        assert exchange_dtype(torch.zeros(2, dtype=torch.long)) == torch.long
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert exchange_dtype(x) == torch.float32


def test_queue_wraps_around_and_keeps_ids_and_labels_with_their_keys():
    queue = KeyQueue(12, 4)
    written = []
    for step in range(4):  # 16 keys into 12 slots
        keys = F.normalize(torch.randn(4, 4), dim=1)
        ids = torch.arange(4) + 4 * step
        queue.enqueue(keys, ids, ids + 100)
        written.append((keys, ids))
    assert queue.ptr.item() == 4
    assert torch.equal(queue.keys[:4], written[3][0])  # the 4th batch overwrote slots 0..3
    assert torch.equal(queue.keys[4:], torch.cat([written[1][0], written[2][0]]))
    assert queue.ids.tolist() == [12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert torch.equal(queue.labels, queue.ids + 100)


def test_queue_starts_identical_everywhere_with_empty_ids():
    a, b = KeyQueue(8, 4), KeyQueue(8, 4)
    assert torch.equal(a.keys, b.keys)
    assert (a.ids == -1).all() and (a.labels == -1).all()
    torch.testing.assert_close(a.keys.norm(dim=1), torch.ones(8))


def test_queue_refuses_a_global_batch_that_does_not_divide_k():
    queue = KeyQueue(10, 4)
    with pytest.raises(ValueError, match="k_moco=10 must be a multiple of the global batch 4"):
        queue.enqueue(torch.randn(4, 4), torch.arange(4))


def test_forward_enqueues_the_keys_and_labels_of_the_batch():
    moco = small_moco()
    ids, labels = torch.arange(8), torch.arange(8) % 2
    moco(images(8, 1), images(8, 2), ids, labels)
    assert moco.queue.ptr.item() == 8
    assert torch.equal(moco.queue.ids[:8], ids) and torch.equal(moco.queue.labels[:8], labels)


@pytest.mark.parametrize("start1,start2", [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_curriculum_zero_means_from_the_first_step(start1, start2):
    moco = small_moco(start1_hard=start1, start2_hard=start2)
    for step in range(5):
        assert moco.mixing_sizes(step) == (4 if step >= start1 else 0, 4 if step >= start2 else 0)
        _, stats = moco(images(8, step), images(8, 10 + step), torch.arange(8) + 8 * step, step=step)
        assert ("logit_type1" in stats) == (step >= start1)
        assert ("logit_type2" in stats) == (step >= start2)


def test_loss_is_float32_under_bf16_autocast():
    moco = small_moco()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = moco(images(8, 1), images(8, 2), torch.arange(8), torch.arange(8) % 3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in stats.values())
    loss.backward()


def test_step_statistics_from_known_logits():
    # 2 queries, K = 3, one type-1 and one type-2 column each; T folded in already.
    logits = torch.tensor([[5.0, 1.0, 4.0, float("-inf"), 6.0, 2.0], [1.0, 3.0, 0.0, 2.0, 0.5, 1.5]])
    hard = MixedLogits(logits, torch.tensor([[1, 0], [0, 2]]), torch.tensor([[True, True], [True, True]]))
    stats = step_statistics(hard, queue_size=3, s1=1, s2=1, labels=torch.tensor([7, 8]),
                            queue_labels=torch.tensor([7, 8, 9]))
    assert stats["acc1"] == 0.5  # query 0: 5 > 4; query 1: 1 < 3
    assert stats["logit_pos"] == 3.0
    assert stats["logit_hardest"] == 3.5
    assert stats["logit_type1"] == 3.25 and stats["logit_type2"] == 1.75
    assert stats["synthetic_above_pos"] == 0.5  # 6 > 5 and 1.5 > 1 of the four
    assert stats["hard_false_negative"] == 0.25  # only query 0's entry 0 (label 7) shares its class


def test_hard_false_negatives_count_only_hard_negatives_of_known_class_and_valid_slots():
    logits = torch.zeros(2, 1 + 4)
    # Query 0 (class 7): slots 0 (7), 1 (unlabelled), 3 (masked). Query 1 (class -1: unknown): slots 2, 3.
    hard = MixedLogits(logits, torch.tensor([[0, 1, 3], [2, 3, 0]]),
                       torch.tensor([[True, True, False], [True, True, True]]))
    stats = step_statistics(hard, queue_size=4, s1=0, s2=0, labels=torch.tensor([7, -1]),
                            queue_labels=torch.tensor([7, -1, -1, 7]))
    # Known pairs: query 0 with slot 0 only (slot 1 unlabelled, slot 3 masked); query 1 has no known class.
    assert stats["hard_false_negative"] == 1.0
    stats = step_statistics(hard, queue_size=4, s1=0, s2=0, labels=torch.tensor([8, -1]),
                            queue_labels=torch.tensor([7, -1, -1, 7]))
    assert stats["hard_false_negative"] == 0.0  # an unlabelled slot is not "the same class" as anything


def _train(moco, optimizer, start_step, steps):
    losses = []
    for step in range(start_step, start_step + steps):
        loss, _ = moco(images(8, step), images(8, 100 + step), torch.arange(8) + 8 * step,
                       torch.arange(8) % 3, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moco.momentum_update()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_continues_bit_identically():
    moco = small_moco(bn_splits=2)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1, momentum=0.9)
    _train(moco, optimizer, 0, 2)
    saved = copy.deepcopy((moco.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    straight = _train(moco, optimizer, 2, 3)

    resumed = small_moco(bn_splits=2)
    resumed_optimizer = torch.optim.SGD(resumed.encoder_q.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    assert _train(resumed, resumed_optimizer, 2, 3) == straight
    for name, value in moco.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_split_batchnorm_normalises_each_group_on_its_own_and_averages_running_stats():
    net = timm.create_model("test_efficientnet", num_classes=0)  # BatchNormAct2d layers
    split = convert_split_batchnorm(copy.deepcopy(net), 2)
    x = images(8, 3)
    halves = [copy.deepcopy(net) for _ in range(2)]
    expected = torch.cat([h(part) for h, part in zip(halves, x.chunk(2))])
    torch.testing.assert_close(split(x), expected)
    bn_names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(type(m).__name__ == "BatchNormAct2d" for m in net.modules())
    for name in bn_names[:3]:
        layers = [dict(h.named_modules())[name] for h in halves]
        got = dict(split.named_modules())[name]
        torch.testing.assert_close(got.running_mean, (layers[0].running_mean + layers[1].running_mean) / 2)
        assert got.num_batches_tracked.item() == 1
    assert split.state_dict().keys() == net.state_dict().keys()
    split.eval(), net.eval()
    net.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), net(x))


def test_single_process_shuffle_returns_each_sample_its_own_key():
    moco = small_moco(bn_splits=4)
    moco.encoder_k.eval()  # a sample's key no longer depends on its batch
    x = images(8, 5)
    local, global_keys = moco.encode_keys(x)
    torch.testing.assert_close(local, moco.encoder_k(x))
    assert global_keys is local


def test_models_without_batchnorm_skip_the_shuffle():
    vit = MoCoEncoder("test_vit", 16, img_size=IMAGE)
    moco = MoCo(vit, dim_moco=16, k_moco=16, m_moco=0.9, t_moco=0.2, bn_splits=4)
    assert not moco.shuffle_keys
    loss, _ = moco(images(4, 0), images(4, 1), torch.arange(4))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_hard=33), "n_hard"),
        (dict(n_hard=1, s1_hard=4), "n_hard"),
        (dict(t_moco=0.0), "temperature"),
        (dict(m_moco=1.5), "m_moco"),
        (dict(start1_hard=-1), "start1_hard"),
    ],
)
def test_bad_model_options_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_moco(**overrides)
