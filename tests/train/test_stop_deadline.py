"""Each launcher's deadline after a stop signal, and the trainer's warning when a step plus a save
would not fit in it."""

import logging
import math
import subprocess
import sys

import pytest
from accelerate import PartialState
from tiny_run import TINY, run_train

from hnmix.train.preemption import SIMPLE_LAUNCHER_GRACE_S, StopDeadline, stop_deadline
from launch import REPO


def test_torchs_elastic_agent_gives_its_shutdown_timeout(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert stop_deadline().seconds == 30  # torch's default
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "150")
    assert stop_deadline().seconds == 150


def test_a_process_without_a_launcher_has_no_deadline(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert stop_deadline().seconds == math.inf  # pytest's parent is no launcher


@pytest.mark.multiprocess
def test_accelerates_single_process_launcher_gives_5_s(tmp_path):
    script = tmp_path / "deadline.py"
    script.write_text("from hnmix.train.preemption import stop_deadline\nprint('deadline', stop_deadline().seconds)\n")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet", str(script)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"deadline {SIMPLE_LAUNCHER_GRACE_S}" in done.stdout


def test_the_warning_names_the_times_the_deadline_and_the_way_out(caplog):
    PartialState()
    deadline = StopDeadline(5.0, "accelerate launch with one process", "Use launch/one_gpu.sh.")
    with caplog.at_level(logging.WARNING):
        assert not deadline.warn_if_too_short(step_s=1.0, save_s=3.9)
        assert caplog.records == []
        assert deadline.warn_if_too_short(step_s=1.0, save_s=4.5)
    [warning] = caplog.records
    assert "1.0 s" in warning.message and "4.5 s" in warning.message and "5 s" in warning.message
    assert "accelerate launch with one process" in warning.message and "launch/one_gpu.sh" in warning.message


def test_the_trainer_warns_once_when_a_save_does_not_fit(tmp_path):
    """Under torch's agent with no time after the signal, two saves give one warning."""
    done = run_train(*TINY, "-s", "4", "-ss", "2", "--num_workers", "0", "--eval_every", "0", "-do", str(tmp_path),
                     env_extra={"TORCHELASTIC_RUN_ID": "test", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0", "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch's elastic agent (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) leaves 0 s to finish the step and save" in done.stderr
    assert done.stderr.count("take longer than the 0 s") == 1


def test_the_time_until_the_ranks_agree_counts_when_longer_than_the_step(caplog):
    """Several processes agree on a stop about once a second, not after every step: a run of
    short steps may train on that long after the signal before it saves."""
    PartialState()
    deadline = StopDeadline(5.0, "torch's elastic agent (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)", "Raise it.")
    with caplog.at_level(logging.WARNING):
        assert not deadline.warn_if_too_short(step_s=0.1, save_s=3.9, agree_s=1.0)
        assert caplog.records == []
        assert deadline.warn_if_too_short(step_s=0.1, save_s=4.5, agree_s=1.0)
    [warning] = caplog.records
    assert "up to 1.0 s until the ranks agree on the stop" in warning.message and "4.5 s" in warning.message
