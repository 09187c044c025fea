"""Resume on another number of processes (same global batch) and exactly mid-window on the same
number, through the real launcher."""

import shutil

import pytest
from safetensors.torch import load_file

from launch import REPO, accelerate_launch
from tiny_run import TINY, checkpoints, losses, metrics, run_train

pytestmark = pytest.mark.multiprocess
COMMON = [*TINY, "-s", "12", "-sp", "5", "-ss", "100", "--num_workers", "0", "--eval_every", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2 x 4 run, and one stopped at step 7 (in the middle of the 6-10 window)."""
    root = tmp_path_factory.mktemp("world_size")
    straight, stopped = root / "straight", root / "stopped"
    for out, extra in ((straight, []), (stopped, ["--stop_at", "7"])):
        done = accelerate_launch(["-m", "hnmix.train", *COMMON, "-bs", "4", "-do", str(out), *extra])
        assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints(stopped) == ["step_00000007"]  # --stop_at saves its step (-ss 100 would not)
    return straight, stopped


def queue_ids(dir_out):
    return load_file(dir_out / "checkpoints/step_00000012/model.safetensors")["queue.ids"]


def test_a_resume_in_the_middle_of_a_window_logs_exactly_the_uninterrupted_means(runs, tmp_path):
    straight, stopped = runs
    out = tmp_path / "again"
    shutil.copytree(stopped, out)
    done = accelerate_launch(["-m", "hnmix.train", *COMMON, "-bs", "4", "-do", str(out), "--resume", "latest"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == losses(straight)  # bit-identical floats, the 10-step window included
    assert [r["acc1"] for r in metrics(out)] == [r["acc1"] for r in metrics(straight)]


def test_two_processes_resume_on_one_with_the_same_global_batch_at_the_same_samples(runs, tmp_path):
    straight, stopped = runs
    out = tmp_path / "one"
    shutil.copytree(stopped, out)
    done = run_train(*COMMON, "-bs", "8", "-do", str(out), "--resume", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2 -> 1 (batch_size 4 -> 8, global batch 8 unchanged" in " ".join(done.stderr.split())
    # The queue's ids are the samples of the last 8 steps (K 64 / 8): the same as the 2-process run's.
    assert queue_ids(out).tolist() == queue_ids(straight).tolist()
    assert [r["step"] for r in metrics(out)] == [5, 10, 12]


def test_another_global_batch_is_refused_with_the_one_the_checkpoint_needs(runs, tmp_path, capfd):
    from hnmix.train.loop import main  # the command line's, in this process: a refusal needs no trainer start

    _, stopped = runs
    out = tmp_path / "refused"
    shutil.copytree(stopped, out)
    assert main([*COMMON, "-bs", "4", "-do", str(out), "--resume", "latest"]) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "cannot resume" in last and "global batch 4 (4 x 1 processes)" in last and "--batch_size 8" in last


def test_a_slow_data_preparation_on_rank_0_does_not_time_out_the_other_rank(tmp_path):
    done = accelerate_launch([str(REPO / "tests/multiprocess/slow_preparation.py"), *COMMON, "-s", "2", "-bs", "4",
                              "-do", str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [2]
