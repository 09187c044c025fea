"""A new run never overwrites an old one: refused before any compute unless asked to, and a
requeued run that never saved restarts cleanly."""

import os

from tiny_run import TINY, checkpoints, metrics, run_train

QUICK = [*TINY, "-s", "4", "-sp", "2", "-ss", "2", "--num_workers", "0", "--eval_every", "0"]


def snapshot(directory):
    """{relative path: (size, mtime)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_runs_dir_out_is_refused_and_changes_nothing(tmp_path):
    assert run_train(*QUICK, "-do", str(tmp_path)).returncode == 0
    (tmp_path / "encoder/evaluation_linear.json").write_text("{}")
    before = snapshot(tmp_path)
    again = run_train(*QUICK, "-s", "6", "-do", str(tmp_path))
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hnmix: error: dir_out {tmp_path} already holds a run (checkpoints, metrics.jsonl")
    assert "--resume latest" in last and "--overwrite_dir_out" in last and "another --dir_out" in last
    assert snapshot(tmp_path) == before


def test_overwrite_dir_out_clears_the_old_run_first(tmp_path):
    assert run_train(*QUICK, "-do", str(tmp_path)).returncode == 0
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


def test_stale_hub_snapshots_are_removed_at_start_up(tmp_path):
    stale = tmp_path / ".hub-staging/hnmix-hub-x"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"a hard link to a pruned checkpoint")
    assert run_train(*QUICK, "-do", str(tmp_path)).returncode == 0
    assert not (tmp_path / ".hub-staging").exists()
