"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: tiny convolutions (blurs, grouped convolutions) are tens of
    times slower with 2 threads on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
