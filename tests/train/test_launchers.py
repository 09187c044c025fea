"""SIGTERM under every launcher the README names: the trainers save, nothing is orphaned, and the
code or marker a requeue script reads says the run stopped (75 / dir_out/STOPPED)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import TINY, checkpoints, metrics

from launch import REPO

pytestmark = pytest.mark.multiprocess
LONG = [*TINY, "-s", "400", "-sp", "1", "-ss", "1000", "--num_workers", "0", "--eval_every", "0"]


def environment() -> dict:
    """The test's Python first on PATH (the scripts call `accelerate`), no user accelerate config."""
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                         "HF_HOME": str(REPO / ".pytest-hf-home")}


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for_records(dir_out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (dir_out / "metrics.jsonl").exists() and len(metrics(dir_out)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} records in {dir_out} (exit {process.poll()})")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "(Z)" in _state(pid):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return "(" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] + ")"
    except OSError:
        return "(gone)"


def test_sigterm_to_the_readmes_single_process_launcher_saves_instead_of_orphaning_the_trainer(tmp_path):
    """`accelerate launch --config_file accelerate_config.yaml` with one process runs Accelerate's
    simple launcher, which does not forward signals: the trainer asks the kernel for SIGTERM when
    its launcher dies, saves, leaves STOPPED and exits 75."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "--cpu",
         "--mixed_precision", "no", "-m", "hnmix.train", *LONG, "-do", str(tmp_path)],
        cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_records(tmp_path, 2, launcher)
    [trainer] = children(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=30)
    assert launcher.returncode == -signal.SIGTERM  # what a scheduler sees of a bare launcher: 143 in a shell
    assert gone(trainer, timeout=120), "the trainer outlived its launcher"
    [stopped_at] = checkpoints(tmp_path)
    marker = (tmp_path / "STOPPED").read_text()
    assert "stopped by SIGTERM" in marker and stopped_at in marker and "--resume latest" in marker
    assert int(stopped_at.split("_")[1]) < 400


def test_sigterm_to_the_two_process_script_saves_on_both_ranks_and_exits_75(tmp_path):
    script = subprocess.Popen(
        ["bash", "launch/cpu_two_processes.sh", *LONG, "-bs", "4"], cwd=REPO,
        env=environment() | {"DIR_OUT": str(tmp_path)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_records(tmp_path, 2, script)
    script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=240)
    assert script.returncode == 75, stderr[-3000:]
    [stopped_at] = checkpoints(tmp_path)
    assert (tmp_path / "checkpoints" / stopped_at / "random_states_1.pkl").exists()  # rank 1 saved too
    assert stopped_at in (tmp_path / "STOPPED").read_text()


def test_a_run_that_finishes_leaves_no_stopped_marker(tmp_path):
    (tmp_path / "STOPPED").write_text("from an earlier stop\n")
    tmp_path.joinpath("checkpoints").mkdir()
    done = subprocess.run([sys.executable, "-m", "hnmix.train", *TINY, "-s", "2", "--num_workers", "0",
                           "--eval_every", "0", "-do", str(tmp_path)], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "STOPPED").exists()
