"""hnmix.train on CUDA: a step without host synchronisation in bf16 and fp16, `--compile` with a
resume. Marked `cuda` and skipped without a GPU (the GPU check runs them).

The fused optimizer's guarded step alone is tested without synchronisation in
tests/train/test_optim.py (`test_fused_guarded_step_does_not_synchronise_on_cuda`); here it is
the whole step of the real trainer, data loading included.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tiny_run import TINY, losses, metrics, run_train

from hnmix.train.config import TrainConfig
from launch import REPO

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NO_EVALUATION = ["--eval_every", "0", "--num_workers", "1"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_do_not_synchronise_outside_the_log_lines(tmp_path, precision):
    """6 steps, a log line every 3: steps 2..6 run under `torch.cuda.set_sync_debug_mode("error")`
    from their photometric half to the log line's read-out (tests/cuda/sync_free_train.py), so any
    wait for the GPU in a step, or in loading the next batch, fails the run."""
    command = [sys.executable, str(REPO / "tests/cuda/sync_free_train.py"), *TINY, "-s", "6", "-sp", "3", "-ss", "100",
               *NO_EVALUATION, "--mixed_precision", precision, "--augment_device", "accelerator", "-do", str(tmp_path)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # the check may add its wheels
    env = os.environ | {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["guarded_steps"] == [1, 2, 3, 4, 5], "the hooks did not guard every step after the first"
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    if precision == "bf16":  # (fp16's loss scaler may skip its first steps while it finds its scale)
        assert records[-1]["skipped_steps"] == 0


def test_compiled_training_resumes_with_the_losses_of_the_uninterrupted_run(tmp_path, record_property):
    """--compile on CUDA: 4 steps with a checkpoint at step 2, then a second compiled run resumed
    from that checkpoint. Its losses are the uninterrupted run's. float32, so that the tolerance
    (1e-5 relative) is far below what another batch, augmentation or queue would change, but above
    what a different reduction order gives: inductor times its kernel variants at compile time and
    may pick others in another process. Bitwise equality is recorded (`bitwise_identical`), and
    asserted by the `--deterministic` test."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = [*TINY, "-s", "4", "-sp", "1", "-ss", "2", *NO_EVALUATION, "--compile", "--mixed_precision", "no"]
    first = run_train(*options, "-do", str(straight), timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_train(*options, "-do", str(resumed), "--resume", str(straight / "checkpoints/step_00000002"),
                       timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    expected, got = losses(straight), losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    assert all(math.isfinite(loss) for loss in expected.values())
    record_property("bitwise_identical", all(got[step] == expected[step] for step in got))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.skipif("deterministic" not in TrainConfig().options(),
                    reason="not yet: hnmix.train has no --deterministic option")
def test_deterministic_run_and_its_resume_repeat_the_losses_exactly(tmp_path):
    """--deterministic in bf16 (the README's promise on CUDA): a run resumed from step 2 of
    another logs the uninterrupted run's losses bit for bit, convolution backward and the
    mixing's scatter_add_ included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = [*TINY, "-s", "4", "-sp", "1", "-ss", "2", *NO_EVALUATION, "--mixed_precision", "bf16", "--deterministic"]
    first = run_train(*options, "-do", str(straight))
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_train(*options, "-do", str(resumed), "--resume", str(straight / "checkpoints/step_00000002"))
    assert second.returncode == 0, second.stderr[-4000:]
    expected = losses(straight)
    assert sorted(expected) == [1, 2, 3, 4]
    assert losses(resumed) == {step: expected[step] for step in (3, 4)}
