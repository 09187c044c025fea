"""--mixed_precision through the trainer on the CPU: bf16 autocasts the encoders and keeps float32
weights; fp16, which Accelerate would run there as plain float32 (no autocast, no loss scaling),
is refused with one line before any compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from tiny_run import TINY, losses

import hnmix.train.loop
from hnmix.train.config import parse_config
from hnmix.train.loop import main, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK = [*TINY, "-s", "2", "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The precision is part of Accelerate's process-wide state: each test starts and leaves it fresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_bf16_runs_the_encoders_in_bfloat16_and_saves_float32_weights(tmp_path, monkeypatch, capfd):
    real_build_model = hnmix.train.loop.build_model
    dtypes = []

    def build_model(*args, **kwargs):
        moco = real_build_model(*args, **kwargs)
        for encoder in (moco.encoder_q, moco.encoder_k):
            encoder.backbone.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        return moco

    monkeypatch.setattr(hnmix.train.loop, "build_model", build_model)
    monkeypatch.setattr(hnmix.train.loop, "refresh_curves", lambda dir_out: None)  # no pictures: CI time
    assert train(parse_config([*QUICK, "--mixed_precision", "bf16", "-do", str(tmp_path)])) == 0
    assert "mixed precision bf16" in " ".join(capfd.readouterr().err.split())
    assert len(dtypes) == 2 * 2 and set(dtypes) == {torch.bfloat16}  # both encoders, both steps
    assert all(np.isfinite(loss) for loss in losses(tmp_path).values())
    weights = load_file(tmp_path / "checkpoints/step_00000002/model.safetensors")
    assert {value.dtype for name, value in weights.items() if value.is_floating_point()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU (tests/cuda/test_cuda_training.py)")
def test_fp16_on_the_cpu_is_refused_with_one_line_before_any_compute(tmp_path, capfd):
    assert main([*QUICK, "--mixed_precision", "fp16", "-do", str(tmp_path)]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == ("hnmix: error: option mixed_precision=fp16 needs a GPU: on the CPU Accelerate trains in "
                         "float32, without autocast or loss scaling; pass --mixed_precision bf16 (or no) on the CPU")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
