"""Fixtures of the data tests: no network, a cache directory per test.
"""

from __future__ import annotations

import datasets
import huggingface_hub.constants
import pytest


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test reaches the network. huggingface_hub and datasets read HF_HUB_OFFLINE at import,
    so the flags they already hold are patched as well as the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "hf_cache")
