"""Fixtures of the evaluation tests: no network; a fresh Accelerate state and logger per test."""

from __future__ import annotations

import logging

import datasets
import huggingface_hub.constants
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test reaches the network (see tests/data/conftest.py)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def fresh_accelerate_and_logging():
    """The CLI runs in this process: give every test a fresh Accelerate state and the hnmix logger back."""
    hnmix_logger = logging.getLogger("hnmix")
    handlers, level = list(hnmix_logger.handlers), hnmix_logger.level
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions are slower with 2 threads on a 2-core machine
    yield
    torch.set_num_threads(threads)
    hnmix_logger.handlers[:], hnmix_logger.level = handlers, level
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
