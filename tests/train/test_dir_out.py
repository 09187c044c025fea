"""A new run never overwrites an old one: refused before any compute unless asked to, and a
requeued run that never saved restarts cleanly."""

import os
import shutil

import pytest
from tiny_run import TINY, checkpoints, metrics, run_train
from hnmix.run_config import load_run_config

QUICK = [*TINY, "-s", "4", "-sp", "2", "-ss", "2", "--num_workers", "0", "--eval_every", "0"]


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """A QUICK run into a dir_out holding what a run killed before its first checkpoint leaves
    (config.yaml, a partial record, a checkpoint whose save never finished) and a Hub snapshot a
    crash left. Several tests read this one run (each trainer start costs seconds of imports)."""
    dir_out = tmp_path_factory.mktemp("rerun")
    dir_out.joinpath("config.yaml").write_text("steps: 4\n")
    dir_out.joinpath("metrics.jsonl").write_text('{"step": 2, "loss": 9.0}\n')
    (dir_out / "checkpoints/.partial-step_00000002").mkdir(parents=True)  # killed during its first save
    stale = dir_out / ".hub-staging/hnmix-hub-x"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"a hard link to a pruned checkpoint")
    result = run_train(*QUICK, "-do", str(dir_out))
    assert result.returncode == 0, result.stderr[-2000:]
    return dir_out


def copy_of(run, directory):
    """`directory` made a copy of the finished run `run`, for a test that changes it."""
    shutil.copytree(run, directory, dirs_exist_ok=True)
    return directory


def snapshot(directory):
    """{relative path: (size, mtime)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_runs_dir_out_is_refused_and_changes_nothing(rerun, tmp_path):
    copy_of(rerun, tmp_path)
    (tmp_path / "encoder/evaluation_linear.json").write_text("{}")
    before = snapshot(tmp_path)
    again = run_train(*QUICK, "-s", "6", "-do", str(tmp_path))
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hnmix: error: dir_out {tmp_path} already holds a run (checkpoints, metrics.jsonl")
    assert "--resume latest" in last and "--overwrite_dir_out" in last and "another --dir_out" in last
    assert snapshot(tmp_path) == before


def test_overwrite_dir_out_clears_the_old_run_first(rerun, tmp_path):
    copy_of(rerun, tmp_path)
    (tmp_path / "encoder/evaluation_linear.json").write_text("{}")
    assert run_train(*QUICK, "-s", "6", "-ss", "3", "-do", str(tmp_path), "--overwrite_dir_out").returncode == 0
    assert [r["step"] for r in metrics(tmp_path)] == [2, 4, 6]  # one run's records, no second "step 2"
    assert checkpoints(tmp_path) == ["step_00000003", "step_00000006"]
    assert not (tmp_path / "encoder/evaluation_linear.json").exists()


def test_resume_auto_without_a_checkpoint_restarts_without_the_partial_records(tmp_path):
    tmp_path.joinpath("metrics.jsonl").write_text('{"step": 2, "loss": 9.0}\n')  # a run killed before its first save
    os.utime(tmp_path / "metrics.jsonl")
    assert run_train(*QUICK, "-do", str(tmp_path), "--resume", "auto").returncode == 0
    assert [r["step"] for r in metrics(tmp_path)] == [2, 4] and metrics(tmp_path)[0]["loss"] != 9.0


def test_stale_hub_snapshots_are_removed_at_start_up(rerun):
    assert not (rerun / ".hub-staging").exists()


def test_a_resumed_runs_config_yaml_starts_the_same_run_afresh_in_another_dir_out(tmp_path):
    """config.yaml describes the run, not the invocation: no resume/overwrite_dir_out/config, so
    `--config DIR_OUT/config.yaml --dir_out NEW` repeats the run (same losses) instead of failing
    on `resume: latest`."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert run_train(*QUICK, "--stop_at", "2", "-do", str(first)).returncode == 0
    resumed = run_train(*QUICK, "--resume", "latest", "--overwrite_dir_out", "-do", str(first))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for saved in (first / "config.yaml", first / "checkpoints/step_00000004/config.yaml"):
        assert {"resume", "overwrite_dir_out", "config"}.isdisjoint(load_run_config(saved)), saved
    rerun = run_train("--config", str(first / "config.yaml"), "-do", str(again))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert [(r["step"], r["loss"]) for r in metrics(again)] == [(r["step"], r["loss"]) for r in metrics(first)]


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_a_rerun(rerun):
    """Its config.yaml and metrics.jsonl are leftovers, not a run: the rerun replaces them."""
    assert [r["step"] for r in metrics(rerun)] == [2, 4] and metrics(rerun)[0]["loss"] != 9.0
    assert checkpoints(rerun) == ["step_00000002", "step_00000004"]


def test_a_run_that_fails_before_writing_anything_leaves_no_folder_it_created(tmp_path):
    result = run_train(*QUICK, "-a", "resnet_does_not_exist", "-do", str(tmp_path / "new/run"))
    assert result.returncode == 2 and "unknown timm model" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_a_dir_out_that_existed_before(tmp_path):
    result = run_train(*QUICK, "-a", "resnet_does_not_exist", "-do", str(tmp_path))
    assert result.returncode == 2 and tmp_path.is_dir()
