"""A stop signal as each launcher the README names delivers it, with DataLoader workers on: the
trainers finish the step, save on every rank, leave dir_out/STOPPED, nothing is orphaned, the
exit code is the README's, and `--resume latest` continues exactly as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import TINY, checkpoints, losses, metrics

from launch import REPO, accelerate_launch_command

pytestmark = pytest.mark.multiprocess
# Workers on, as users run: the signal reaches them too.
LONG = [*TINY, "-s", "400", "-sp", "1", "-ss", "1000", "--num_workers", "2", "--eval_every", "0"]
TWO_PROCESSES = ["-bs", "4"]  # the same global batch as TINY's 8 on one process


def environment() -> dict:
    """The test's Python first on PATH (the scripts call `accelerate`), no user accelerate config."""
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                         "HF_HOME": str(REPO / ".pytest-hf-home")}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def wait_for_records(dir_out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (dir_out / "metrics.jsonl").exists() and len(metrics(dir_out)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} records in {dir_out} (exit {process.poll()})")


def all_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_state(pid) in ("gone", "Z") for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def stopped_step(dir_out: Path, *, ranks: int) -> int:
    """The step of the one checkpoint, which STOPPED names and every rank saved."""
    [name] = checkpoints(dir_out)
    marker = (dir_out / "STOPPED").read_text()
    assert "stopped by SIGTERM" in marker and name in marker and "--resume latest" in marker, marker
    for rank in range(ranks):
        assert (dir_out / "checkpoints" / name / f"random_states_{rank}.pkl").exists(), f"rank {rank} did not save"
    return int(name.split("_")[1])


def train(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "hnmix.train", *args], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def two_process_script(dir_out: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["bash", "launch/cpu_two_processes.sh", *LONG, *TWO_PROCESSES, *args], cwd=REPO,
                            env=environment() | {"DIR_OUT": str(dir_out)}, text=True, **popen)


def assert_resumes_exactly(dir_out: Path, reference: Path, step: int, *, resume) -> None:
    """`--resume latest` to step + 2, through `resume(*args)`, logs the losses of an uninterrupted
    run (`reference`, trained to that step or further), the stopped run's records included."""
    resume("--resume", "latest", "--stop_at", str(step + 2))
    assert not (dir_out / "STOPPED").exists()
    expected = {s: loss for s, loss in losses(reference).items() if s <= step + 2}
    assert sorted(expected) == list(range(1, step + 3))
    assert losses(dir_out) == expected


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    """reference(steps): an uninterrupted `python -m hnmix.train` LONG run to `steps` steps or
    more, trained once for this file's one-process tests (a trainer's start costs seconds), with
    10 steps to spare for the next stop. Each is trained into a dir_out that holds an earlier
    stop's STOPPED marker and an empty checkpoints/, which a run that finishes must remove."""
    runs: list[tuple[int, Path]] = []

    def reference(steps: int) -> Path:
        if not runs or runs[-1][0] < steps:
            out = tmp_path_factory.mktemp("reference")
            (out / "STOPPED").write_text("from an earlier stop\n")
            out.joinpath("checkpoints").mkdir()
            train(*LONG, "-do", str(out), "--stop_at", str(steps + 10))
            runs.append((steps + 10, out))
        return runs[-1][1]

    return reference


def test_sigterm_to_accelerate_launch_with_one_process_saves_within_its_grace(tmp_path, one_process_reference):
    """`accelerate launch` with one process: accelerate >= 1.16 terminates the trainer's whole tree,
    the DataLoader workers included, and SIGKILLs it 5 s later. The trainer saves first, leaves
    STOPPED, and the launcher exits 143, which the scheduler sees."""
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "--cpu",
         "--mixed_precision", "no", "--quiet", "-m", "hnmix.train", *LONG, "-do", str(run)],
        cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_records(run, 2, launcher)
    tree = descendants(launcher.pid)
    assert len(tree) == 3, f"expected the trainer and its 2 workers, found {tree}"
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "is killed by signal" not in stderr, stderr[-3000:]
    assert all_gone(tree, timeout=30), "a process of the trainer's tree outlived its launcher"
    step = stopped_step(run, ranks=1)
    assert step < 400
    assert "leaves 5 s to finish the step and save" in stderr  # the launcher's deadline, said at start-up
    assert_resumes_exactly(run, one_process_reference(step + 2), step,
                           resume=lambda *args: train(*LONG, "-do", str(run), *args))


def test_sigterm_to_a_setsid_runs_process_group_saves_and_exits_75(tmp_path, one_process_reference):
    """`kill -TERM -- -PGID` on a `setsid python -m hnmix.train` (SLURM signals every process of
    the step alike): the workers get it too and must not die of it."""
    run = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-m", "hnmix.train", *LONG, "-do", str(run)], cwd=REPO,
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for_records(run, 2, trainer)
    workers = descendants(trainer.pid)
    assert len(workers) == 2, workers
    os.killpg(trainer.pid, signal.SIGTERM)
    _, stderr = trainer.communicate(timeout=120)
    assert trainer.returncode == 75, stderr[-3000:]
    assert all_gone(workers, timeout=30), "a DataLoader worker outlived the trainer"
    step = stopped_step(run, ranks=1)
    assert_resumes_exactly(run, one_process_reference(step + 2), step,
                           resume=lambda *args: train(*LONG, "-do", str(run), *args))


def test_sigterm_to_the_two_process_scripts_group_saves_on_both_ranks_and_exits_75(tmp_path):
    """`launch/cpu_two_processes.sh` signalled as a job: SIGTERM to its process group (the script
    and `accelerate launch`); torch's elastic agent then `killpg`s each trainer's group, its
    DataLoader workers included."""
    run = tmp_path / "run"
    script = two_process_script(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_records(run, 2, script)
    tree = descendants(script.pid)
    os.killpg(script.pid, signal.SIGTERM)
    _, stderr = script.communicate(timeout=240)
    assert script.returncode == 75, stderr[-3000:]
    assert "is killed by signal" not in stderr, stderr[-3000:]
    assert all_gone(tree, timeout=30), "a process of the run outlived the script"
    step = stopped_step(run, ranks=2)

    def through_the_script(directory: Path, *args: str) -> None:
        done = two_process_script(directory, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = done.communicate(timeout=300)
        assert done.returncode == 0, stderr[-3000:]

    through_the_script(tmp_path / "reference", "--stop_at", str(step + 2))
    assert_resumes_exactly(run, tmp_path / "reference", step, resume=lambda *args: through_the_script(run, *args))


def test_sigterm_to_accelerate_launch_with_two_processes_leaves_stopped(tmp_path):
    """A bare `accelerate launch` with several processes (no script around it): the agent forwards
    the signal, both ranks save, and the launcher exits 128 + SIGTERM; STOPPED says the run stopped."""
    run = tmp_path / "run"
    command, env = accelerate_launch_command(["--quiet", "-m", "hnmix.train", *LONG, *TWO_PROCESSES, "-do", str(run)])
    launcher = subprocess.Popen(command, cwd=REPO, env=env | {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_records(run, 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "is killed by signal" not in stderr, stderr[-3000:]
    step = stopped_step(run, ranks=2)
    state = json.loads((run / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    first, second = state["queue_sha256_per_rank"]
    assert first == second  # both ranks saved the same step with the same queue


def test_a_run_that_finishes_leaves_no_stopped_marker(one_process_reference):
    """The reference run started in a dir_out with STOPPED from an earlier stop and ran to its --stop_at."""
    reference = one_process_reference(2)
    assert not (reference / "STOPPED").exists()


@pytest.mark.parametrize("how", ["two-process script", "README's accelerate launch"])
def test_a_bad_option_is_one_line_before_any_launch(tmp_path, how):
    """The launch scripts check the options before their launcher starts (exit 2, as
    `python -m hnmix.train`); the README's `accelerate launch --quiet` prints the trainer's line
    alone, and accelerate turns its 2 into 1."""
    if how == "two-process script":
        command, expected = ["bash", "launch/cpu_two_processes.sh", "--k_moco", "1000"], 2
        env = environment() | {"DIR_OUT": str(tmp_path / "run")}
    else:
        command, expected = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                             "accelerate_config.yaml", "-m", "hnmix.train", "--config", "configs/mochi_caltech256.yaml",
                             "--dir_out", str(tmp_path / "run"), "--k_moco", "1000"], 1
        env = environment()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == expected, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hnmix: error: option k_moco=1000 must be a multiple"), lines
