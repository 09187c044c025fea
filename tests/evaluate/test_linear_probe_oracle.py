"""The linear probe against a float64 oracle: torch.optim.Adam and autograd on one setting at a time.

The oracle follows `fit_softmax_classifiers`' docstring and nothing of its code: mean cross
entropy + weight_decay / 2 * ||W||^2, Adam (0.9, 0.999, 1e-8) from zero, the learning rate on a
cosine from lr to 0 over the steps, mini-batches in `torch.randperm` order from a generator seeded
with `seed` (the one choice both sides share). `train_linear_probe` is then standardisation, that
fit per grid point, selection by validation top-1 and a refit, written out again here.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hnmix.evaluate.probes import (
    LINEAR_LRS,
    LINEAR_WEIGHT_DECAYS,
    fit_softmax_classifiers,
    train_linear_probe,
)


def oracle_fit(features, labels, *, num_classes, lr, weight_decay, epochs, batch_size, seed):
    """(weights [D, C], bias [C]) float64 of one setting."""
    features, labels = features.double(), labels.long()
    n, dim = features.shape
    weights = torch.zeros(dim, num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weights, bias], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    total = epochs * math.ceil(n / batch_size)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(features[batch] @ weights + bias, labels[batch])
            loss = loss + weight_decay / 2 * weights.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return weights.detach(), bias.detach()


def oracle_standardise(fitted_on, features):
    """z-scores with the mean and population std (at least 1e-6) of `fitted_on`, float64."""
    fitted_on, features = fitted_on.double(), features.double()
    return (features - fitted_on.mean(0)) / fitted_on.std(0, unbiased=False).clamp_min(1e-6)


def oracle_accuracy(scores, labels):
    """(top-1 %, top-min(5, C) %) counting how many classes score strictly above the label."""
    above = (scores > scores.gather(1, labels.long().unsqueeze(1))).sum(1)
    return 100.0 * (above == 0).double().mean().item(), 100.0 * (above < 5).double().mean().item()


def oracle_probe(train, val, test, *, num_classes, lrs, weight_decays, epochs, batch_size, seed, refit):
    """What train_linear_probe returns, computed by the oracle."""
    fit = {"num_classes": num_classes, "epochs": epochs, "batch_size": batch_size, "seed": seed}
    settings = [(lr, wd) for lr in lrs for wd in weight_decays]
    val_top1 = []
    for lr, wd in settings:
        weights, bias = oracle_fit(oracle_standardise(train[0], train[0]), train[1], lr=lr, weight_decay=wd, **fit)
        val_top1.append(oracle_accuracy(oracle_standardise(train[0], val[0]) @ weights + bias, val[1])[0])
    best = val_top1.index(max(val_top1))
    lr, wd = settings[best]
    if refit:
        train = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    weights, bias = oracle_fit(oracle_standardise(train[0], train[0]), train[1], lr=lr, weight_decay=wd, **fit)
    top1, top5 = oracle_accuracy(oracle_standardise(train[0], test[0]) @ weights + bias, test[1])
    return {"linear_top1": top1, "linear_top5": top5, "linear_best_lr": lr, "linear_best_weight_decay": wd,
            "linear_val_top1": val_top1[best],
            "linear_grid": [{"lr": a, "weight_decay": b, "val_top1": v} for (a, b), v in zip(settings, val_top1)]}


def assert_same_report(result, expected):
    """train_linear_probe's dict equals the oracle's, accuracies up to float rounding."""
    assert result.keys() == expected.keys()
    grid, expected_grid = result.pop("linear_grid"), expected.pop("linear_grid")
    assert result == pytest.approx(expected)
    assert len(grid) == len(expected_grid)
    for point, expected_point in zip(grid, expected_grid):
        assert point == pytest.approx(expected_point)


def noisy_split(n, seed, num_classes=6, dim=5):
    """Features [n, dim] with per-dimension offsets and scales (some std < 1, one constant dimension),
    labels [n] of which the first two dimensions tell something, not all."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    features = torch.randn(n, dim, generator=g) * torch.tensor([0.3, 2.0, 1.0, 0.5, 0.0]) + torch.arange(dim) * 3.0
    features[:, 0] += 0.6 * (labels % 3).float()
    features[:, 1] += 3.0 * (labels // 3).float()
    return features, labels


SETTINGS = [(0.05, 0.1), (0.01, 0.0), (0.1, 0.01)]  # lr and weight decay both differ between groups


def test_fit_softmax_classifiers_matches_adam_on_each_setting_alone():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(30, 5, generator=g), torch.randint(0, 6, (30,), generator=g)
    # Dimension 4's gradients are about Adam's eps: its steps show where eps is added.
    features[:, 4] *= 1e-7
    fit = {"num_classes": 6, "epochs": 3, "batch_size": 7, "seed": 4}  # 5 steps per epoch, the last of 2 samples
    weights, biases = fit_softmax_classifiers(features, labels, settings=SETTINGS, **fit)
    assert weights.shape == (3, 5, 6) and biases.shape == (3, 6)
    for group, (lr, wd) in enumerate(SETTINGS):
        expected_w, expected_b = oracle_fit(features, labels, lr=lr, weight_decay=wd, **fit)
        torch.testing.assert_close(weights[group].double(), expected_w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(biases[group].double(), expected_b, rtol=1e-4, atol=1e-6)


def test_fit_softmax_classifiers_draws_its_batches_from_seed_zero_by_default():
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(20, 5, generator=g), torch.randint(0, 6, (20,), generator=g)
    weights, _ = fit_softmax_classifiers(features, labels, num_classes=6, settings=[(0.05, 0.0)], epochs=2,
                                         batch_size=7)
    expected, _ = oracle_fit(features, labels, num_classes=6, lr=0.05, weight_decay=0.0, epochs=2, batch_size=7,
                             seed=0)
    torch.testing.assert_close(weights[0].double(), expected, rtol=1e-4, atol=1e-6)


def test_fit_softmax_classifiers_keeps_everything_on_the_features_device():
    """The meta device stands in for a GPU: a tensor made on the CPU would not mix with it."""
    features, labels = noisy_split(20, 2)
    weights, biases = fit_softmax_classifiers(features.to("meta"), labels.to("meta"), num_classes=6,
                                              settings=SETTINGS, epochs=2, batch_size=6)
    assert weights.device.type == biases.device.type == "meta"
    assert weights.shape == (3, 5, 6) and biases.shape == (3, 6)


def test_linear_probe_with_its_defaults_is_the_oracles_grid_search_and_refit():
    # 300 training samples: two batches of the default 256 a epoch.
    train, val, test = noisy_split(300, 3), noisy_split(60, 4), noisy_split(80, 5)
    result = train_linear_probe(*train, *val, *test, num_classes=6)
    expected = oracle_probe(train, val, test, num_classes=6, lrs=LINEAR_LRS, weight_decays=LINEAR_WEIGHT_DECAYS,
                            epochs=10, batch_size=256, seed=0, refit=True)
    assert_same_report(result, expected)


def test_linear_probe_picks_the_best_validation_top1_and_refits_on_train_and_val_with_the_seed():
    train, val, test = noisy_split(50, 16), noisy_split(30, 17), noisy_split(40, 18)
    # A learning rate of 1e-5 leaves the classifier barely away from zero after 12 steps.
    options = {"lrs": (1e-5, 2.0), "weight_decays": (0.0, 0.01), "epochs": 3, "batch_size": 16, "seed": 3}
    result = train_linear_probe(*train, *val, *test, num_classes=6, **options)
    expected = oracle_probe(train, val, test, num_classes=6, refit=True, **options)
    assert (expected["linear_best_lr"], expected["linear_best_weight_decay"]) == (2.0, 0.0)  # not the grid's first
    assert_same_report(result, expected)
    without_refit = train_linear_probe(*train, *val, *test, num_classes=6, refit_on_train_and_val=False, **options)
    assert_same_report(without_refit, oracle_probe(train, val, test, num_classes=6, refit=False, **options))
    assert without_refit["linear_top1"] != result["linear_top1"]


def test_linear_probe_on_three_classes_selects_on_top1_not_top5():
    """With three classes every setting is 100% at top-5; top-1 still tells them apart."""
    train, val, test = noisy_split(40, 9, num_classes=3), noisy_split(30, 10, num_classes=3), noisy_split(30, 11, 3)
    options = {"lrs": (1e-5, 0.05), "weight_decays": (0.0,), "epochs": 2, "batch_size": 16, "seed": 0}
    result = train_linear_probe(*train, *val, *test, num_classes=3, **options)
    assert result["linear_best_lr"] == 0.05 and result["linear_top5"] == 100.0
    assert_same_report(result, oracle_probe(train, val, test, num_classes=3, refit=True, **options))


@pytest.mark.parametrize(
    "change",
    [{"lrs": ()}, {"weight_decays": ()}, {"epochs": 0}, {"batch_size": 0}],
)
def test_each_empty_grid_or_zero_size_alone_raises(change):
    data = noisy_split(10, 12)
    options = {"lrs": (0.01,), "weight_decays": (0.0,), "epochs": 1, "batch_size": 4} | change
    with pytest.raises(ValueError, match=r"^need lrs, weight_decays, epochs >= 1 and batch_size >= 1; got "):
        train_linear_probe(*data, *data, *data, num_classes=6, **options)


def test_one_epoch_of_single_sample_batches_is_allowed():
    data = noisy_split(10, 13)
    options = {"lrs": (0.01,), "weight_decays": (0.0,), "epochs": 1, "batch_size": 1, "seed": 0}
    result = train_linear_probe(*data, *data, *data, num_classes=6, **options)
    assert_same_report(result, oracle_probe(data, data, data, num_classes=6, refit=True, **options))
