"""hnmix.train.schedule: the learning rate and the key encoder's momentum, against values worked out by hand."""

import math

import pytest

from hnmix.train.config import parse_config
from hnmix.train.schedule import lr_schedule, momentum_schedule


def lr(config, step):
    return config.optimization.lr_base * lr_schedule(config.optimization)(step)


def test_seed_schedule_warms_up_linearly_over_a_tenth_then_follows_the_cosine_of_all_steps():
    config = parse_config(["-s", "10000", "-lrb", "0.1", "-lrw", "0.001", "-lrm", "0.0", "-st1h", "0", "-st2h", "0"])
    assert lr(config, 0) == pytest.approx(0.001)
    assert lr(config, 500) == pytest.approx(0.001 + 500 * (0.1 - 0.001) / 1000)  # half-way up the warmup
    # At the end of the warmup the cosine (over all 10000 steps) has already begun: 0.05 (1 + cos(pi/10)).
    assert lr(config, 1000) == pytest.approx(0.05 * (1 + math.cos(math.pi / 10)))
    assert lr(config, 5000) == pytest.approx(0.05)
    assert lr(config, 10000) == pytest.approx(0.0)


def test_without_warmup_it_is_moco_v2s_cosine_from_the_peak_to_lr_min():
    config = parse_config(["-s", "200", "-lrb", "0.06", "--warmup_fraction", "0",
                           "-lrm", "0", "-st1h", "0", "-st2h", "0"])
    assert lr(config, 0) == pytest.approx(0.06)
    assert lr(config, 50) == pytest.approx(0.03 * (1 + math.cos(math.pi / 4)))
    assert lr(config, 199) == pytest.approx(0.03 * (1 + math.cos(math.pi * 199 / 200)))


def test_momentum_is_constant_by_default_and_rises_to_one_on_a_cosine_when_asked():
    constant = parse_config(["-s", "100", "-mm", "0.99", "-st1h", "0", "-st2h", "0"])
    assert {momentum_schedule(constant.method, constant.optimization.steps)(step) for step in (0, 50, 100)} == {0.99}
    cosine = parse_config(["-s", "100", "-mm", "0.99", "--momentum_schedule", "cosine", "-st1h", "0", "-st2h", "0"])
    momentum_at = momentum_schedule(cosine.method, cosine.optimization.steps)
    assert momentum_at(0) == pytest.approx(0.99)
    assert momentum_at(50) == pytest.approx(0.995)  # 1 - 0.01 (cos(pi/2) + 1) / 2
    assert momentum_at(100) == pytest.approx(1.0)
