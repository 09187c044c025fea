"""hnmix.train.checkpoints: only complete checkpoints count, retention keeps the newest."""

import logging

import pytest

from hnmix.errors import ConfigError
from hnmix.train.checkpoints import (
    TRAINER_STATE,
    checkpoint_path,
    complete_checkpoints,
    prune_checkpoints,
    resolve_resume,
)


def make_checkpoint(root, step, *, complete=True):
    path = checkpoint_path(root, step) if complete else root / f".partial-step_{step:08d}"
    path.mkdir(parents=True)
    (path / TRAINER_STATE).write_text(f'{{"step": {step}}}')
    return path


def test_latest_is_the_newest_complete_checkpoint_and_partial_ones_are_ignored_with_a_warning(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, 4)
    newest = make_checkpoint(root, 12)
    make_checkpoint(root, 16, complete=False)  # killed during its save
    (root / "step_00000020").mkdir()  # no trainer_state.json: not complete either
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", tmp_path) == newest
    assert any(".partial-step_00000016" in r.getMessage() for r in caplog.records)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000004", "step_00000012"]


def test_auto_starts_fresh_without_checkpoints_and_latest_refuses(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path), tmp_path)


def test_retention_keeps_the_newest_and_never_touches_partial_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        make_checkpoint(root, step)
    partial = make_checkpoint(root, 10, complete=False)
    prune_checkpoints(root, keep=2)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000006", "step_00000008"]
    assert partial.exists()
    prune_checkpoints(root, keep=0)  # 0 keeps everything
    assert len(complete_checkpoints(root)) == 2


def test_a_checkpoints_safetensors_files_get_the_mode_of_its_other_files(tmp_path):
    """safetensors writes 0600; a team sharing a machine must be able to read a checkpoint."""
    import os

    import torch
    from accelerate import Accelerator

    from hnmix.train.checkpoints import save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    previous = os.umask(0o022)
    try:
        saved = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, {"config.yaml": "a: 1\n"})
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in saved.iterdir() if path.is_file()}
    assert modes["model.safetensors"] == modes["config.yaml"] == 0o644, modes
