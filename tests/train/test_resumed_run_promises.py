"""One tiny run in this process, stopped at step 6 of 8 and resumed with `--resume auto` and
`--steps 12`, checked for what the README promises of such a run: the learning rate it logs
(warmup, then the cosine, reshaped by the new --steps), gradient clipping inside the step,
checkpoint retention while it runs, which checkpoint `auto` picks, the changed options it
logs, and a dir_out/config.yaml that loads back with --config."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
from tiny_run import TINY, checkpoints, metrics

import hnmix.train.loop
from hnmix.train.config import parse_config
from hnmix.train.loop import train
from hnmix.train.optim import NonFiniteGuard

LR_BASE, LR_WARMUP, LR_MIN, CLIP = 0.01, 0.001, 0.0001, 0.05
COMMON = [*TINY, "-sp", "1", "--keep_checkpoints", "2", "--num_workers", "0", "--eval_every", "0",
          "-lrb", str(LR_BASE), "-lrw", str(LR_WARMUP), "-lrm", str(LR_MIN), "--warmup_fraction", "0.5",
          "--clip_grad", str(CLIP)]
FIRST = [*COMMON, "-s", "8", "--stop_at", "6", "-ss", "1"]
RESUMED = [*COMMON, "-s", "12", "-ss", "2", "--resume", "auto"]


@dataclasses.dataclass
class Run:
    dir_out: Path
    first_records: list[dict]  # metrics.jsonl after the first half
    log: list[str]  # the messages of the "hnmix" logger, both halves
    grad_norms: list[tuple[float, float]]  # per step: (norm before clipping, norm the optimizer stepped with)
    kept_after_each_save: list[list[str]]  # the checkpoints after each save of the first half


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    dir_out = tmp_path_factory.mktemp("resumed_run")
    result = Run(dir_out, [], [], [], [])
    real_step, real_save = NonFiniteGuard.step, hnmix.train.loop.save_training_state

    def step(self, grad_norm):
        grads = [p.grad for group in self.inner.param_groups for p in group["params"] if p.grad is not None]
        stepped_with = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        result.grad_norms.append((grad_norm.item(), stepped_with.item()))
        return real_step(self, grad_norm)

    def save(*args, **kwargs):
        saved = real_save(*args, **kwargs)
        result.kept_after_each_save.append(checkpoints(dir_out))
        return saved

    class Collect(logging.Handler):
        def emit(self, record):
            result.log.append(record.getMessage().removeprefix("[RANK 0] "))

    handler = Collect(level=logging.INFO)
    logging.getLogger("hnmix").addHandler(handler)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions are slower with 2 threads on a 2-core machine
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(NonFiniteGuard, "step", step)
            patch.setattr(hnmix.train.loop, "save_training_state", save)
            patch.setattr(hnmix.train.loop, "refresh_curves", lambda dir_out: None)  # no pictures: CI time
            assert train(parse_config([*FIRST, "-do", str(dir_out)])) == 0
            result.first_records = metrics(dir_out)
            patch.setattr(hnmix.train.loop, "save_training_state", real_save)
            assert train(parse_config([*RESUMED, "-do", str(dir_out)])) == 0
    finally:
        torch.set_num_threads(threads)
        logging.getLogger("hnmix").removeHandler(handler)
    return result


def cosine(step: int, steps: int) -> float:
    return LR_MIN + 0.5 * (LR_BASE - LR_MIN) * (1 + math.cos(math.pi * step / steps))


def test_the_logged_lr_warms_up_linearly_then_follows_the_cosine_of_all_steps(run):
    # A record at step s holds the lr of the step that follows it, schedule(s). 8 steps, warmup
    # 0.5 x 8 = 4 steps from 0.001 to 0.01: 0.001 + s x 0.009 / 4; from step 4 the cosine over 8.
    lr = {r["step"]: r["lr"] for r in run.first_records}
    assert sorted(lr) == [1, 2, 3, 4, 5, 6]
    assert lr[1] == pytest.approx(0.00325)
    assert lr[2] == pytest.approx(0.0055)
    assert lr[3] == pytest.approx(0.00775)
    assert lr[4] == pytest.approx(0.00505)  # 0.0001 + 0.00495 (1 + cos(pi/2)): the cosine had begun
    assert lr[5] == pytest.approx(0.0001 + 0.00495 * (1 + math.cos(5 * math.pi / 8)))
    assert lr[6] == pytest.approx(0.0001 + 0.00495 * (1 - math.sqrt(0.5)))


def test_a_resume_with_another_steps_follows_the_schedule_of_the_new_total(run):
    lr = {r["step"]: r["lr"] for r in metrics(run.dir_out)}
    # 12 steps: warmup 6, so steps 6..11 are on the cosine over 12 (over 8, step 7 would be 0.00048).
    assert lr[7] == pytest.approx(0.0001 + 0.00495 * (1 + math.cos(7 * math.pi / 12)))
    assert lr[7] == pytest.approx(0.003769, abs=1e-6)
    assert lr[9] == pytest.approx(0.0001 + 0.00495 * (1 - math.sqrt(0.5)))
    assert [lr[s] for s in range(7, 12)] == pytest.approx([cosine(s, 12) for s in range(7, 12)])
    assert lr[12] == pytest.approx(LR_MIN)


def test_clip_grad_bounds_the_gradient_norm_the_optimizer_steps_with(run):
    assert len(run.grad_norms) >= 12  # every step of both halves
    for before, stepped_with in run.grad_norms:
        assert before > CLIP  # every step needed clipping here (TINY's gradients are far larger than 0.05)
        assert stepped_with == pytest.approx(CLIP, rel=1e-4)


def test_keep_checkpoints_prunes_at_every_save_during_the_run(run):
    # --keep_checkpoints 2, a checkpoint every step up to --stop_at 6.
    assert run.kept_after_each_save == [["step_00000001"]] + [
        [f"step_{step - 1:08d}", f"step_{step:08d}"] for step in range(2, 7)]


def test_resume_auto_continues_from_the_newest_of_the_kept_checkpoints(run):
    resumed = [m for m in run.log if m.startswith("Resumed from")]
    assert resumed == [f"Resumed from {run.dir_out / 'checkpoints/step_00000006'} at step 6"]  # of 5 and 6
    assert [r["step"] for r in metrics(run.dir_out)] == list(range(1, 13))


def test_the_options_changed_on_resume_are_logged(run):
    [changed] = [m for m in run.log if m.startswith("Resuming with changed options: ")]
    assert changed.removeprefix("Resuming with changed options: ").split("; ") == [
        "steps: 8 -> 12", "stop_at: 6 -> None", "steps_save: 1 -> 2"]


def test_dir_out_config_yaml_is_the_resolved_config_and_loads_back_with_config(run):
    path = run.dir_out / "config.yaml"
    reloaded = parse_config(["--config", str(path)])
    assert reloaded.run.config == str(path)
    # The run's options, not the invocation's (--resume auto): it loads back as a fresh start.
    assert reloaded.with_options(config=None) == parse_config([*RESUMED, "-do", str(run.dir_out)]).with_options(
        resume=None)
