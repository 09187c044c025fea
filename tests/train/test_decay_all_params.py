"""--decay_all_params: weight decay on every parameter (MoCo's own code) beside timm's default
exclusion of biases and norm layers, for every optimizer, with the fused kernels kept."""

import pytest
import torch

from hnmix.moco import MoCo, MoCoEncoder
from hnmix.train.config import config_differences, parse_config
from hnmix.train.optim import fused_available, make_optimizer

WEIGHT_DECAY, LR = 0.01, 0.5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encoder():
    torch.manual_seed(0)
    return MoCo(MoCoEncoder("test_resnet", 8), dim_moco=8, k_moco=16, m_moco=0.9, t_moco=0.2).encoder_q


def decay_of_each_parameter(module, optimizer):
    """{parameter name: its group's weight decay}; every trainable parameter in exactly one group."""
    groups = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(groups)
    named = dict(module.named_parameters())
    assert set(groups) == {id(p) for p in named.values()}
    return {name: groups[id(p)] for name, p in named.items()}


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
@pytest.mark.parametrize("decay_all_params", [False, True])
def test_every_parameter_decays_with_the_option_and_biases_and_norms_do_not_without(name, decay_all_params):
    module = encoder()
    optimizer = make_optimizer(module, name=name, lr=LR, weight_decay=WEIGHT_DECAY, device="cpu",
                               decay_all_params=decay_all_params)
    decays = decay_of_each_parameter(module, optimizer)
    one_dimensional = {n for n, p in module.named_parameters() if p.ndim <= 1}
    assert any(".bn" in n for n in one_dimensional) and any(n.endswith(".bias") for n in one_dimensional)
    for parameter, decay in decays.items():
        excluded = parameter in one_dimensional and not decay_all_params
        assert decay == (0.0 if excluded else WEIGHT_DECAY), parameter
    if name != "lars":  # torch's fused kernels stay: the non-finite guard skips steps through them
        assert fused_available("cpu") and all(g["fused"] for g in optimizer.param_groups)


@pytest.mark.parametrize("decay_all_params", [False, True])
def test_under_lars_a_decayed_norm_weight_is_also_lars_adapted(decay_all_params):
    """timm's LARS adapts exactly the groups with weight decay: a norm weight's first step is plain
    SGD without the option, and the trust-ratio-scaled step of its decayed gradient with it
    (float64 by hand: trust = 0.001 |p| / (|g| + wd |p|))."""
    module = encoder()
    weight = module.backbone.bn1.weight
    optimizer = make_optimizer(module, name="lars", lr=LR, weight_decay=WEIGHT_DECAY, device="cpu",
                               decay_all_params=decay_all_params)
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.25)
    p, g = weight.detach().double().clone(), weight.grad.double()
    optimizer.step()
    if decay_all_params:
        trust = 0.001 * p.norm() / (g.norm() + WEIGHT_DECAY * p.norm())
        expected = p - LR * trust * (g + WEIGHT_DECAY * p)
    else:
        expected = p - LR * g
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-6, atol=1e-7)


def test_the_option_is_off_by_default_a_flag_and_a_yaml_key_and_may_not_change_on_resume(tmp_path):
    assert parse_config([]).optimization.decay_all_params is False
    assert parse_config(["--decay_all_params"]).optimization.decay_all_params is True
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("decay_all_params: true\n")
    assert parse_config(["--config", str(recipe)]).optimization.decay_all_params is True
    older = {name: value for name, value in parse_config([]).to_dict().items() if name != "decay_all_params"}
    assert config_differences(older, parse_config([])) == []  # a checkpoint from before the option
    assert config_differences(older, parse_config(["--decay_all_params"])) == ["decay_all_params: False -> True"]
