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
    """The CLI runs in this process and configures the root logger: give every test a fresh
    Accelerate state and the root logger's handlers (pytest's capture among them) back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions are slower with 2 threads on a 2-core machine
    yield
    torch.set_num_threads(threads)
    root.handlers[:], root.level = handlers, level
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
