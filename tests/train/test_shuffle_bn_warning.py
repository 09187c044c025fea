"""The start-up warning of a run without shuffle BN (one process, a BatchNorm model, --bn_splits 1).
The trainer's own log is checked in test_log_lines.py (one process: once) and test_train.py
(two processes: never)."""

import pytest

from hnmix.moco import MoCo, MoCoEncoder
from hnmix.train.components import shuffle_bn_warning


def moco(arch, bn_splits, **encoder_options):
    return MoCo(MoCoEncoder(arch, 16, **encoder_options), dim_moco=16, k_moco=32, m_moco=0.9, t_moco=0.2,
                bn_splits=bn_splits)


def test_a_batchnorm_model_on_one_process_without_splits_is_warned_with_the_cost_and_the_way_out():
    line = shuffle_bn_warning(moco("test_resnet", bn_splits=1), num_processes=1)
    assert line is not None and "\n" not in line
    assert "No shuffle BN" in line and "4% kNN at 800 epochs" in line and "--bn_splits 8" in line


@pytest.mark.parametrize("bn_splits,num_processes", [(8, 1), (1, 2), (2, 4)])
def test_shuffled_keys_are_not_warned_about(bn_splits, num_processes):
    """--bn_splits > 1 shuffles within the process; several processes shuffle across ranks."""
    assert shuffle_bn_warning(moco("test_resnet", bn_splits=bn_splits), num_processes=num_processes) is None


def test_a_model_without_batchnorm_is_not_warned_about():
    assert shuffle_bn_warning(moco("test_vit", bn_splits=1, img_size=32), num_processes=1) is None
