"""Ctrl-C (SIGINT) in a run in this process, sent from inside a training step: the first finishes
the step, saves and stops with 75; a second interrupts at once."""

from __future__ import annotations

import os
import signal

import pytest
from tiny_run import TINY, checkpoints, metrics

import hnmix.train.loop
from hnmix.train.config import parse_config
from hnmix.train.loop import train
from hnmix.train.optim import NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = [*TINY, "-s", "12", "-sp", "1", "--num_workers", "0", "--eval_every", "0"]


def ctrl_c_in_step(monkeypatch, step: int, times: int, signum: int = signal.SIGINT) -> list[str]:
    """Send SIGINT (or `signum`) `times` times from inside the optimizer step of step `step`
    (1-based); the returned list gets "stepped" for every optimizer step that ran to its end."""
    real_step = NonFiniteGuard.step
    done = []

    def step_with_ctrl_c(self, grad_norm):
        if len(done) + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        applied = real_step(self, grad_norm)
        done.append("stepped")
        return applied

    monkeypatch.setattr(NonFiniteGuard, "step", step_with_ctrl_c)
    monkeypatch.setattr(hnmix.train.loop, "refresh_curves", lambda dir_out: None)  # no pictures: CI time
    return done


@pytest.fixture(autouse=True)
def interactive_sigint():
    """SIGINT as an interactive pytest has it: a shell's background job (CI) starts with it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_finishes_the_step_saves_and_returns_75(tmp_path, monkeypatch):
    done = ctrl_c_in_step(monkeypatch, step=3, times=1)
    try:
        code = train(parse_config([*RUN, "-ss", "100", "-do", str(tmp_path)]))
    except KeyboardInterrupt:  # (would end the whole pytest session if it got through)
        pytest.fail("the first Ctrl-C interrupted the run instead of stopping it after the step")
    assert code == 75
    assert len(done) == 3 and checkpoints(tmp_path) == ["step_00000003"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    marker = (tmp_path / "STOPPED").read_text()
    assert "stopped by SIGINT after step 3" in marker and "step_00000003" in marker
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's, given back


def test_a_second_ctrl_c_interrupts_at_once_without_a_save(tmp_path, monkeypatch):
    done = ctrl_c_in_step(monkeypatch, step=3, times=2)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config([*RUN, "-ss", "2", "-do", str(tmp_path)]))
    assert len(done) == 2  # step 3 never reached its end
    assert checkpoints(tmp_path) == ["step_00000002"] and not (tmp_path / "STOPPED").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigusr1_stops_as_sigterm_does(tmp_path, monkeypatch):
    """SLURM's `--signal=USR1@SECONDS` is a common way to ask for a save before the time limit."""
    before = signal.getsignal(signal.SIGUSR1)
    ctrl_c_in_step(monkeypatch, step=2, times=1, signum=signal.SIGUSR1)
    assert train(parse_config([*RUN, "-ss", "100", "-do", str(tmp_path)])) == 75
    assert checkpoints(tmp_path) == ["step_00000002"]
    assert "stopped by SIGUSR1 after step 2" in (tmp_path / "STOPPED").read_text()
    assert signal.getsignal(signal.SIGUSR1) is before
