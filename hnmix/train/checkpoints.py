"""Checkpoint directories: names, atomic saves, retention, and finding the one to resume.

A checkpoint is `DIR_OUT/checkpoints/step_NNNNNNNN/`: what `Accelerator.save_state` writes
(model.safetensors with both encoders and the queue, optimizer, scheduler, one RNG file per
rank) plus `trainer_state.json` (step, epoch) and `config.yaml`. It is written under a temporary
name and renamed into place by the main process once every rank has finished, so a directory
with the final name is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from accelerate.utils import gather_object

from hnmix.errors import CheckpointError, ConfigError, describe
from hnmix.hub.export import readable_like_siblings

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer_state.json"


def checkpoints_root(dir_out: str | Path) -> Path:
    return Path(dir_out) / "checkpoints"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def resolve_resume(resume: str, dir_out: str | Path) -> Optional[Path]:
    """The checkpoint directory that `--resume PATH|latest|auto` names.

    `latest` is the newest complete checkpoint in dir_out (ConfigError when there is none);
    `auto` is the same but None when there is none (a fresh start), for requeued jobs.
    """
    if resume in ("latest", "auto"):
        root = checkpoints_root(dir_out)
        for partial in sorted(root.glob(".partial-*")) if root.is_dir() else []:
            logger.warning(f"Ignoring {partial}: a checkpoint whose save did not finish")
        found = complete_checkpoints(root)
        if not found and resume == "auto":
            return None
        if not found:
            raise ConfigError(f"--resume latest: no complete checkpoint under {checkpoints_root(dir_out)}; "
                              "start without --resume or give a checkpoint directory")
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE}); "
                          f"give DIR_OUT/checkpoints/step_NNNNNNNN or `latest`")
    return path


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, files: dict[str, str]) -> Path:
    """Save the training state of every rank at `step`, plus `files` (name -> text) from the main
    process, atomically. Every rank must call this. Returns the final directory.

    A write that fails on any rank (a full disk, a vanished mount) raises CheckpointError on every
    rank: the partial directory is removed and the complete checkpoints stay as they were.
    """
    final = checkpoint_path(root, step)
    partial = root / f".partial-{final.name}"
    problem = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            for name, text in files.items():
                (partial / name).write_text(text)
            readable_like_siblings(partial)  # safetensors writes 0600
    except OSError as error:
        problem = describe(error)
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        kept = complete_checkpoints(root)
        raise CheckpointError(f"could not write the checkpoint of step {step} ({problems[0]}); "
                              f"{'the newest complete one is ' + str(kept[-1]) if kept else 'no checkpoint was kept'}; "
                              "free space or choose another --dir_out, then --resume latest")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep=0: keep all)."""
    if keep < 1:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
