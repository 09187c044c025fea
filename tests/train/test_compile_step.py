"""--compile compiles the model Accelerate prepared, the whole step's forward and backward: a
compiled step gives the eager step's loss and gradients (inductor on the CPU, where
reduce-overhead compiles without CUDA graphs), and checkpoints keep the eager state-dict keys."""

import pytest
import torch
from safetensors import safe_open

from hnmix.errors import ConfigError
from hnmix.train.components import build_model, build_optimizer, compile_step, make_accelerator
from hnmix.train.config import parse_config
from hnmix.train.hold_back import batchnorm_statistics, restore_batchnorm_statistics, save_batchnorm_statistics
from tiny_run import TINY

# Mixing of both types from step 0, labels for every statistic; the schedule is of no concern here.
OPTIONS = [*TINY, "-st2h", "0", "--device", "cpu", "--optimizer", "sgd", "-lrb", "0.1", "--warmup_fraction", "0"]
# Inductor's CPU kernels sum in another order than eager ATen (vectorised reductions, fused
# batch norm): about 1e-5 on gradients of order 1e-2, after a step of SGD.
TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def step(model, moco, optimizer, views, step_number: int):
    """One training step as the trainer runs it; returns (loss, {name: gradient})."""
    view_q, view_k, ids, labels = views
    torch.compiler.cudagraph_mark_step_begin()
    saved = save_batchnorm_statistics(batchnorm_statistics(moco))
    loss, _, keys = model(view_q, view_k, ids, labels, step=step_number, enqueue=False)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in moco.encoder_q.named_parameters()}
    optimizer.step()
    applied = torch.tensor(True)
    moco.momentum_update(applied)
    moco.queue.enqueue(*keys, apply=applied)
    restore_batchnorm_statistics(batchnorm_statistics(moco), saved, unless=applied)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), gradients


def test_the_compiled_step_gives_the_eager_steps_loss_and_gradients_and_eager_checkpoint_keys(tmp_path):
    config = parse_config([*OPTIONS, "-do", str(tmp_path / "run"), "--compile", "--compile_mode", "reduce-overhead"])
    accelerator = make_accelerator(config.run)
    prepared = []
    for _ in range(2):  # the same seed: the same initial weights and queue
        moco = build_model(config.model, config.method, (0, 0), seed=config.run.seed)
        prepared.append(accelerator.prepare(moco, build_optimizer(config.optimization, moco.encoder_q, accelerator.device)))
    (eager, eager_optimizer), (compiled_model, compiled_optimizer) = prepared
    compiled = compile_step(compiled_model, config.run.compile_mode)
    generator = torch.Generator().manual_seed(0)
    for step_number in range(3):  # the first compiles, the second again with the step number dynamic
        views = (torch.randn(8, 3, 32, 32, generator=generator), torch.randn(8, 3, 32, 32, generator=generator),
                 torch.arange(8) + 8 * step_number, torch.arange(8) % 3)
        eager_loss, eager_gradients = step(eager, eager, eager_optimizer, views, step_number)
        loss, gradients = step(compiled, compiled_model, compiled_optimizer, views, step_number)
        torch.testing.assert_close(loss, eager_loss, **TOLERANCE)
        assert gradients.keys() == eager_gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(gradient, eager_gradients[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(compiled_model.queue.keys, eager.queue.keys, **TOLERANCE)

    accelerator.save_state(str(tmp_path / "state"))
    for file in ("model.safetensors", "model_1.safetensors"):  # the eager model's, then the compiled one's
        with safe_open(tmp_path / "state" / file, "pt") as saved:
            assert set(saved.keys()) == set(eager.state_dict()), file


def test_compile_mode_is_one_of_torchs_and_needs_compile():
    assert parse_config([*OPTIONS, "--compile", "--compile_mode", "max-autotune"]).run.compile_mode == "max-autotune"
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead needs --compile"):
        parse_config([*OPTIONS, "--compile_mode", "reduce-overhead"])
    with pytest.raises((ConfigError, SystemExit)):
        parse_config([*OPTIONS, "--compile", "--compile_mode", "fast"])
