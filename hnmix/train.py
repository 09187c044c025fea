"""`python -m hnmix.train` / `accelerate launch -m hnmix.train`: one training function.

Accelerate owns devices, mixed precision, processes and checkpoint state. The whole `MoCo`
module is prepared as one model, so one `model.safetensors` holds both encoders and the queue.
DDP runs with `broadcast_buffers=False`: the queue is identical on every rank by construction
(every rank enqueues the gathered global batch), so broadcasting K x d floats every step would
be wasted bandwidth, and the BatchNorm running statistics do not enter a training-mode forward.
They are per rank during training; checkpoints and the exported encoder carry the main
process's. Only the query encoder has trainable parameters, so only its gradients are synced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from difflib import get_close_matches
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, broadcast_object_list, gather_object, set_seed
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hnmix.augment import moco_v2_photometric
from hnmix.checkpoints import (
    checkpoints_root,
    prune_checkpoints,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
    TRAINER_STATE,
)
from hnmix.config import (
    CONFIG_FILE,
    TrainConfig,
    check_queue_fits_global_batch,
    config_differences,
    config_to_yaml,
    parse_config,
)
from hnmix.data import TwoViewDataset, load_image_dataset, make_train_loader, resolve_columns
from hnmix.errors import ConfigError, DataError, HnmixError, HubError
from hnmix.eval_data import NO_LABELS, load_eval_splits
from hnmix.evaluate import KnnMonitor
from hnmix.hub import HubPusher, export_encoder, write_model_card
from hnmix.metrics import RunningCount, StatsWindow, append_record, drop_records_after
from hnmix.moco import MoCo, MoCoEncoder
from hnmix.optim import NonFiniteGuard, make_optimizer
from hnmix.photometric import StepPhotometric
from hnmix.preemption import EXIT_STOPPED, StopSignal

logger = get_logger("hnmix")
# A collective that waits longer than this means a rank is gone: fail then rather than after the
# backend's default. Long enough for the main process to download Caltech-256 (~1.2 GB) while the
# others wait in `main_process_first`, for checkpoint saves and for kNN evaluations.
COLLECTIVE_TIMEOUT_S = 1200
HUB_WAIT_S = 900  # the end of training waits this long for the last upload
HUB_WAIT_ON_STOP_S = 60  # a run stopped by a signal (preemption grace periods are short)
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def seed_lr_schedule(config: TrainConfig):
    """The seed's schedule (timm CosineLRScheduler): linear warmup from lr_warmup to lr_base over
    the first 10% of steps, cosine from lr_base to lr_min over all steps (warmup included, so the
    cosine has already begun when warmup ends). Returns step -> multiplier of lr_base."""
    warmup = int(0.1 * config.steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            lr = config.lr_warmup + step * (config.lr_base - config.lr_warmup) / warmup
        elif step < config.steps:
            lr = config.lr_min + 0.5 * (config.lr_base - config.lr_min) * (1 + math.cos(math.pi * step / config.steps))
        else:
            lr = config.lr_min
        return lr / config.lr_base

    return lr_at


def check_bad_fraction(bad: int, seen: int, max_bad_fraction: float, dataset_size: int) -> None:
    """Stop when too many images were unreadable; judged once enough were read to tell (the whole
    dataset, or 1000 images), so that one bad file in the first batch does not end a run."""
    if seen >= min(dataset_size, 1000) and bad / seen > max_bad_fraction:
        raise DataError(f"{bad} of the {seen} images read so far could not be read ({bad / seen:.1%} > "
                        f"--max_bad_fraction {max_bad_fraction}); fix or remove them, or raise --max_bad_fraction")


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"dir_out {directory} is not writable ({error.strerror or error}); "
                          "choose another --dir_out") from None


def check_arch(arch: str) -> None:
    if ":" in arch or timm.is_model(arch):  # hf-hub:/local-dir: names are resolved by timm itself
        return
    close = get_close_matches(arch, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"option arch: unknown timm model {arch!r}{hint}")


def requested_trackers(report_to: str) -> list[str]:
    """The tracker names of `--report_to`, each known to Accelerate and installed."""
    names = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == "all":
            continue
        if name not in {str(t) for t in LoggerType}:
            raise ConfigError(f"option report_to: unknown tracker {name!r}; one of "
                              f"{', '.join(sorted(str(t) for t in LoggerType))}")
        if name not in available:
            raise ConfigError(f"option report_to: tracker {name!r} is not installed; pip install {name} "
                              "or leave it out of --report_to")
    return names


def make_accelerator(config: TrainConfig) -> Accelerator:
    if config.device not in (None, "cpu"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("option device selects a GPU for one process only; "
                              "under accelerate launch use its --gpu_ids")
        os.environ["CUDA_VISIBLE_DEVICES"] = config.device
    trackers = requested_trackers(config.report_to)
    # torch 2.14 renames the option; Accelerate's kwargs handler only knows the old name, which
    # keeps its meaning (no buffer broadcast in forward; every rank builds identical buffers).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=config.device == "cpu",
            log_with=trackers or None,
            project_dir=config.dir_out,
            step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not samples
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                             InitProcessGroupKwargs(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))],
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
    except (ValueError, ImportError) as error:
        raise ConfigError(f"cannot set up Accelerate: {str(error).splitlines()[0]}") from None


def quiet_other_processes(accelerator: Accelerator) -> None:
    import datasets
    import huggingface_hub

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-save INFO lines drown ours
    if accelerator.is_main_process:
        logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                            handlers=[RichHandler(console=console, show_path=False)], force=True)
        datasets.logging.set_verbosity_warning()
    else:
        logging.basicConfig(level=logging.ERROR, force=True)
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


def augment_on_accelerator(config: TrainConfig, device: torch.device) -> bool:
    """`--augment_device`, resolved for the accelerator `device`: its default is the accelerator
    when that is a GPU."""
    if config.augment_device is None:
        return device.type != "cpu"
    return config.augment_device == "accelerator"


def build_data(config: TrainConfig, accelerator: Accelerator, *, photometric_in_workers: bool):
    """The training DataLoader and whether the data has labels. The workers crop and flip, and
    run the photometric half too when `photometric_in_workers`."""
    with accelerator.main_process_first():
        dataset = load_image_dataset(config.dataset, split=config.split, cache_dir=config.dir_data,
                                     seed=config.seed, synthetic_size=config.synthetic_size)
    image_column, label_column = resolve_columns(dataset, config.image_column, config.label_column)
    photometric = moco_v2_photometric(config.img_size) if photometric_in_workers else None
    views = TwoViewDataset(dataset, image_column=image_column, label_column=label_column, img_size=config.img_size,
                           seed=config.seed, photometric=photometric)
    loader = make_train_loader(views, batch_size=config.batch_size, num_workers=config.num_workers, seed=config.seed)
    return loader, label_column is not None


def build_knn_monitor(config: TrainConfig, accelerator: Accelerator) -> Optional[KnnMonitor]:
    """The kNN monitor on the held-out split, or None when off or the data has no labels."""
    if not config.eval_every:
        return None
    try:
        with accelerator.main_process_first():
            splits = load_eval_splits(
                config.dataset, split=config.split, image_column=config.image_column,
                label_column=config.label_column, eval_split_size=config.eval_split_size,
                max_samples=config.eval_max_samples or None, seed=config.seed, cache_dir=config.dir_data,
                synthetic_size=config.synthetic_size)
    except DataError as error:
        if str(error) != NO_LABELS:
            raise
        logger.warning("The dataset has no labels: training without the kNN monitor")
        return None
    logger.info(f"kNN monitor every {config.eval_every} steps: {splits.describe()}")
    return KnnMonitor.from_splits(splits, accelerator, img_size=config.img_size, batch_size=config.batch_size,
                                  num_workers=config.num_workers, k=config.knn_k, temperature=config.knn_temperature)


def build_model(config: TrainConfig) -> MoCo:
    """The MoCo model of `config`, identical on every rank. With --compile both encoders are
    compiled in place (`nn.Module.compile`: the state-dict keys stay those of the eager model, so
    checkpoints and the export do not depend on the option); the queue update, mixing and loss
    stay eager."""
    set_seed(config.seed)  # the same initial weights on every rank
    moco = MoCo(
        MoCoEncoder(config.arch, config.dim_moco),
        dim_moco=config.dim_moco, k_moco=config.k_moco, m_moco=config.m_moco, t_moco=config.t_moco,
        n_hard=config.n_hard, s1_hard=config.s1_hard, s2_hard=config.s2_hard,
        start1_hard=config.start1_hard, start2_hard=config.start2_hard, bn_splits=config.bn_splits,
    )
    if config.compile:
        moco.encoder_q.compile()
        moco.encoder_k.compile()
    return moco


def checkpoint_to_resume(config: TrainConfig) -> Optional[Path]:
    """The checkpoint `--resume` names, or None; refuses one saved with an incompatible config."""
    checkpoint = resolve_resume(config.resume, config.dir_out) if config.resume else None
    if checkpoint is not None:
        saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
        differences = config_differences(saved, config)
        if differences:
            raise ConfigError(f"cannot resume {checkpoint} with a different configuration: {'; '.join(differences)}")
        allowed = [d for d in config_differences(saved, config, resumable=True) if not d.startswith("resume:")]
        if allowed:
            logger.info(f"Resuming with changed options: {'; '.join(allowed)}")
    return checkpoint


def load_training_state(accelerator: Accelerator, checkpoint: Path, window: StatsWindow, bad_images: RunningCount,
                        guard: NonFiniteGuard, metrics_path: Path) -> int:
    """Restore everything `save_training_state` saved; returns the step. Records of later steps
    (logged before a crash, not covered by the checkpoint) leave metrics.jsonl."""
    accelerator.load_state(str(checkpoint))
    state = read_trainer_state(checkpoint)
    window.load_state(state["stats_window"], accelerator.device)
    bad_images.counted = state["bad_samples"]
    guard.load_state(state)
    if accelerator.is_main_process:
        drop_records_after(metrics_path, state["step"])
    logger.info(f"Resumed from {checkpoint} at step {state['step']}")
    return int(state["step"])


def start_hub_pusher(config: TrainConfig, accelerator: Accelerator) -> Optional[HubPusher]:
    """The main process's pusher, checked (token, repo id, network) before any compute; a failed
    check stops every rank with the same line."""
    if not config.push_to_hub:
        return None
    pusher, problem = None, None
    if accelerator.is_main_process:
        pusher = HubPusher(config.hub_model_id, private=config.hub_private, strategy=config.hub_strategy,
                           staging_dir=Path(config.dir_out) / ".hub-staging")
        try:
            pusher.check()
        except HubError as error:
            problem = str(error)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise HubError(problem)
    return pusher


def publish_encoder(config: TrainConfig, moco: MoCo, results: dict) -> Path:
    """Export the query backbone (timm layout) with its model card to dir_out/encoder."""
    encoder_dir = export_encoder(moco.encoder_q.backbone, Path(config.dir_out) / "encoder", img_size=config.img_size)
    write_model_card(encoder_dir, config=config.to_dict(), results=results, repo_id=config.hub_model_id)
    return encoder_dir


def save_training_state(accelerator: Accelerator, moco: MoCo, window: StatsWindow, bad_images: RunningCount,
                        guard: NonFiniteGuard, config: TrainConfig, step: int, epoch: int) -> Path:
    """A checkpoint of every rank at `step`, then retention. Every rank calls it."""
    root = checkpoints_root(config.dir_out)
    state = {"step": step, "epoch": epoch, "num_processes": accelerator.num_processes,
             "queue_sha256_per_rank": gather_object([moco.queue.fingerprint()]),
             "stats_window": window.state(accelerator), "bad_samples": bad_images.total(accelerator)} | guard.state()
    checkpoint = save_checkpoint(accelerator, root, step, {
        TRAINER_STATE: json.dumps(state, indent=1), CONFIG_FILE: config_to_yaml(config)})
    if accelerator.is_main_process:
        prune_checkpoints(root, config.keep_checkpoints)
    logger.info(f"Saved {checkpoint}")
    return checkpoint


def train(config: TrainConfig) -> int:
    """Train as `config` says; returns 0, or EXIT_STOPPED after a signal and a checkpoint."""
    accelerator = make_accelerator(config)
    quiet_other_processes(accelerator)
    dir_out = Path(config.dir_out)
    check_writable(dir_out)
    check_arch(config.arch)
    check_queue_fits_global_batch(config, accelerator.num_processes)
    checkpoint = checkpoint_to_resume(config)
    pusher = start_hub_pusher(config, accelerator)

    on_accelerator = augment_on_accelerator(config, accelerator.device)
    loader, has_labels = build_data(config, accelerator, photometric_in_workers=not on_accelerator)
    photometric = (StepPhotometric(config.img_size, seed=config.seed, rank=accelerator.process_index)
                   if on_accelerator else None)
    monitor = build_knn_monitor(config, accelerator)
    model = build_model(config)
    optimizer = make_optimizer(model.encoder_q, lr=config.lr_base, weight_decay=0.01, device=accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, seed_lr_schedule(config))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    moco: MoCo = accelerator.unwrap_model(model)
    steps_per_epoch = len(loader)
    # fp16 runs with a loss scaler, which skips the steps with inf/NaN gradients itself.
    guard = NonFiniteGuard(optimizer, config.max_nonfinite_steps, device=accelerator.device,
                           enabled=accelerator.mixed_precision != "fp16")

    metrics_path = dir_out / "metrics.jsonl"
    window, bad_images = StatsWindow(), RunningCount()
    step = load_training_state(accelerator, checkpoint, window, bad_images, guard, metrics_path) if checkpoint else 0
    if accelerator.is_main_process:
        (dir_out / CONFIG_FILE).write_text(config_to_yaml(config))
    accelerator.init_trackers("hnmix", config={k: str(v) if v is None else v for k, v in config.to_dict().items()})

    global_batch = config.batch_size * accelerator.num_processes
    end = config.stop_at or config.steps
    logger.info(f"Training {config.arch} on {config.dataset} ({steps_per_epoch} steps per epoch) with "
                f"{accelerator.num_processes} process(es), global batch {global_batch}, "
                f"mixed precision {accelerator.mixed_precision}, photometric augmentation on "
                f"{'the accelerator' if photometric else 'the CPU workers'}, from step {step} to {end} of {config.steps}")
    results: dict = {"steps": config.steps, "global_batch": global_batch}
    saved = checkpoint
    progress = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}  lr {task.fields[lr]}  kNN {task.fields[knn]}"),
        TimeRemainingColumn(), console=console, disable=not accelerator.is_main_process,
    )
    task = progress.add_task("train", total=config.steps, completed=step, speed="-", loss="-", lr="-", knn="-")
    window_start, window_steps = time.perf_counter(), 0
    stopping = False

    model.train()
    with progress, StopSignal() as stop:
        while step < end and not stopping:
            epoch, skip = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            for view_q, view_k, ids, labels, unreadable in accelerator.skip_first_batches(loader, skip) if skip else loader:
                if photometric:
                    view_q, view_k = photometric(view_q, view_k, step)
                loss, stats = model(view_q, view_k, ids, labels if has_labels else None, step=step)
                accelerator.backward(loss)
                # The norm is equal on every rank (DDP averaged the gradients, NaN/inf included): a
                # non-finite one skips both updates everywhere, decided on the device.
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.clip_grad or math.inf)
                moco.momentum_update(guard.step(grad_norm))
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window.add(stats)
                bad_images.add(unreadable)
                step += 1
                window_steps += 1
                progress.update(task, completed=step)

                record = {}
                if monitor and (step % config.eval_every == 0 or step == end):
                    record = monitor.evaluate(moco.encoder_q.backbone, accelerator)
                    results |= record
                if step % config.steps_print == 0 or step == end:
                    record |= {"lr": scheduler.get_last_lr()[0],
                               "images_per_s": global_batch * window_steps / (time.perf_counter() - window_start)}
                    record |= window.mean_over_processes(accelerator)
                    record["bad_samples"] = bad_images.total(accelerator)
                    record["skipped_steps"] = guard.check(step, saved)
                    check_bad_fraction(record["bad_samples"], step * global_batch, config.max_bad_fraction,
                                       len(loader.dataset))
                    window_start, window_steps = time.perf_counter(), 0
                if record:
                    log_step(accelerator, {"step": step, "epoch": epoch} | record, metrics_path, progress, task)
                stopping = stop.requested()
                if step % config.steps_save == 0 or step == end or stopping:
                    guard.check(step, saved)  # a diverged run is never saved
                    saved = save_training_state(accelerator, moco, window, bad_images, guard, config, step, epoch)
                    if pusher and step < end and not stopping:
                        pusher.on_save(step, encoder_dir=publish_encoder(config, moco, results), checkpoint_dir=saved)
                if step >= end or stopping:
                    break

    if accelerator.is_main_process:
        encoder_dir = publish_encoder(config, moco, results)
        logger.info(f"Exported the encoder to {encoder_dir}: timm.create_model('local-dir:{encoder_dir}', pretrained=True)")
        if pusher and not stopping:
            pusher.on_train_end(step, encoder_dir=encoder_dir, checkpoint_dir=saved)
        if pusher:
            logger.info(f"Waiting for the upload to {config.hub_model_id}")
            pusher.wait(timeout=HUB_WAIT_ON_STOP_S if stopping else HUB_WAIT_S)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stopping:
        logger.warning(f"Stopped by {stop.received.name if stop.received else 'a signal on another rank'} "
                       f"after step {step}, saved in {saved}; continue with --resume latest")
        return EXIT_STOPPED
    return 0


def log_step(accelerator: Accelerator, record: dict, metrics_path: Path, progress: Progress, task) -> None:
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if not accelerator.is_main_process:
        return
    append_record(metrics_path, record)
    if "loss" in record:
        progress.update(task, speed=f"{record['images_per_s']:.0f}", loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if "knn_top1" in record:
        progress.update(task, knn=f"{record['knn_top1']:.1f}")
    details = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "epoch"))
    logger.info(f"step {record['step']}/{progress.tasks[0].total}  epoch {record['epoch']}  {details}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return train(parse_config(argv))
    except HnmixError as error:
        if os.environ.get("RANK", "0") == "0":
            # An error raised in a DataLoader worker arrives with the worker's traceback before it.
            line = str(error).strip().splitlines()[-1]
            console.print(f"hnmix: error: {line}", markup=False, highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
