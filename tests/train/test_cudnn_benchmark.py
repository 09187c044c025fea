"""cuDNN picks its fastest convolution algorithms (`torch.backends.cudnn.benchmark`) on a CUDA
device, where a step's shapes repeat, unless --deterministic asks for runs that repeat exactly."""

import torch

from hnmix.train.components import cudnn_benchmark_on
from hnmix.train.config import parse_config
from tiny_run import TINY


def test_cudnn_benchmark_is_on_for_cuda_unless_deterministic():
    config, deterministic = parse_config(TINY), parse_config([*TINY, "--deterministic"])
    assert cudnn_benchmark_on(config.run, torch.device("cuda", 0))
    assert not cudnn_benchmark_on(deterministic.run, torch.device("cuda", 0))
    assert not cudnn_benchmark_on(config.run, torch.device("cpu"))  # no cuDNN there
