"""What a checkpoint holds of a run beyond Accelerate's state, and which checkpoint to resume.

`save_training_state` writes a checkpoint of every rank (Accelerate's state, `trainer_state.json`
with the step, the statistics window, the counters and each rank's queue fingerprint, and the
config); `load_training_state` restores it; `checkpoint_to_resume` resolves `--resume` and
refuses an incompatible configuration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from hnmix.errors import ConfigError
from hnmix.moco import MoCo
from hnmix.train.checkpoints import (
    TRAINER_STATE,
    checkpoints_root,
    prune_checkpoints,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from hnmix.run_config import flat_options
from hnmix.train.config import (
    CONFIG_FILE,
    TrainConfig,
    config_differences,
    config_to_yaml,
)
from hnmix.train.metrics import RunningCount, StatsWindow, drop_records_after
from hnmix.train.optim import NonFiniteGuard

logger = get_logger("hnmix")


def checkpoint_to_resume(config: TrainConfig, num_processes: int) -> Optional[Path]:
    """The checkpoint `--resume` names, or None; refuses one saved with an incompatible config.

    Another number of processes is allowed when the global batch stays the same (2 x 128 ->
    4 x 64): the run goes on at the same sample of the same epoch order, with the saved queue.
    Any other change of the global batch is refused with the batch the checkpoint needs."""
    checkpoint = resolve_resume(config.run.resume, config.run.dir_out) if config.run.resume else None
    if checkpoint is None:
        return None
    saved = flat_options(yaml.safe_load((checkpoint / CONFIG_FILE).read_text()))  # grouped, or flat (older runs)
    saved_processes = int(read_trainer_state(checkpoint).get("num_processes", num_processes))
    batch = config.optimization.batch_size
    saved_global, global_batch = saved["batch_size"] * saved_processes, batch * num_processes
    if global_batch != saved_global:
        per_process = f"--batch_size {saved_global // num_processes}" if saved_global % num_processes == 0 else (
            f"a number of processes that divides {saved_global}")
        raise ConfigError(f"cannot resume {checkpoint} with global batch {global_batch} ({batch} x "
                          f"{num_processes} processes): it was trained with {saved_global} ({saved['batch_size']} x "
                          f"{saved_processes}); keep the global batch, e.g. {per_process}")
    differences = config_differences(saved | {"batch_size": batch}, config)
    if differences:
        raise ConfigError(f"cannot resume {checkpoint} with a different configuration: {'; '.join(differences)}")
    allowed = config_differences(saved, config, resumable=True)
    if saved_processes != num_processes:
        allowed.append(f"processes: {saved_processes} -> {num_processes} (batch_size {saved['batch_size']} -> "
                       f"{batch}, global batch {global_batch} unchanged; the views and shuffle BN of the "
                       f"steps to come differ from the uninterrupted run's, the samples and the queue do not)")
    if allowed:
        logger.info(f"Resuming with changed options: {'; '.join(allowed)}")
    return checkpoint


def load_training_state(accelerator: Accelerator, checkpoint: Path, window: StatsWindow, bad_images: RunningCount,
                        guard: NonFiniteGuard, metrics_path: Path) -> int:
    """Restore everything `save_training_state` saved; returns the step. Records of later steps
    (logged before a crash, not covered by the checkpoint) leave metrics.jsonl."""
    accelerator.load_state(str(checkpoint))
    state = read_trainer_state(checkpoint)
    window.load_state(state["stats_window"], accelerator.device, rank=accelerator.process_index,
                      world=accelerator.num_processes)
    bad_images.counted = state["bad_samples"]
    guard.load_state(state)
    if accelerator.is_main_process:
        drop_records_after(metrics_path, state["step"])
    logger.info(f"Resumed from {checkpoint} at step {state['step']}")
    return int(state["step"])


def save_training_state(accelerator: Accelerator, moco: MoCo, window: StatsWindow, bad_images: RunningCount,
                        guard: NonFiniteGuard, config: TrainConfig, step: int, epoch: int) -> Path:
    """A checkpoint of every rank at `step`, then retention. Every rank calls it."""
    started = time.perf_counter()
    root = checkpoints_root(config.run.dir_out)
    state = {"step": step, "epoch": epoch, "num_processes": accelerator.num_processes,
             "queue_sha256_per_rank": gather_object([moco.queue.fingerprint()]),
             "stats_window": window.state(accelerator), "bad_samples": bad_images.total(accelerator)} | guard.state()
    checkpoint = save_checkpoint(accelerator, root, step, {
        TRAINER_STATE: json.dumps(state, indent=1), CONFIG_FILE: config_to_yaml(config)})
    if accelerator.is_main_process:
        prune_checkpoints(root, config.run.keep_checkpoints)
    logger.info(f"Saved {checkpoint} in {time.perf_counter() - started:.1f} s")
    return checkpoint
