"""The training loop: `python -m hnmix.train` / `accelerate launch -m hnmix.train` run `main`.

Accelerate owns devices, mixed precision, processes and checkpoint state. The whole `MoCo`
module is prepared as one model, so one `model.safetensors` holds both encoders and the queue.
DDP runs with `broadcast_buffers=False`: the queue is identical on every rank by construction
(every rank enqueues the gathered global batch), so broadcasting K x d floats every step would
be wasted bandwidth, and the BatchNorm running statistics do not enter a training-mode forward.
They are per rank during training; checkpoints and the exported encoder carry the main
process's. Only the query encoder has trainable parameters, so only its gradients are synced.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from hnmix.data.photometric import StepPhotometric
from hnmix.errors import DataError, HnmixError, describe, first_line
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.moco import MoCo
from hnmix.pictures.curves import copy_curves, refresh_curves
from hnmix.train.components import (
    augment_on_accelerator,
    build_data,
    build_knn_monitor,
    build_model,
    build_optimizer,
    check_views_fit_in_memory,
    check_writable,
    compile_step,
    console,
    cudnn_benchmark_on,
    describe_device,
    make_accelerator,
    out_of_memory_line,
    prepare_dir_out,
    publish_encoder,
    quiet_other_processes,
    removed_if_left_empty,
    resolve_curriculum,
    shuffle_bn_warning,
    start_hub_pusher,
    use_deterministic_algorithms,
)
from hnmix.train.config import (
    CONFIG_FILE,
    TrainConfig,
    config_to_yaml,
    eval_every_steps,
    parse_config,
)
from hnmix.train.log_lines import format_details, format_record, tracker_locations
from hnmix.train.metrics import RunningCount, StatsWindow, append_record
from hnmix.train.optim import NonFiniteGuard
from hnmix.train.preflight import check_options, report_error
from hnmix.train.preemption import (
    EXIT_STOPPED,
    StopSignal,
    follow_the_launcher,
    StopDeadline,
    stop_deadline,
    write_stopped_marker,
)
from hnmix.train.schedule import lr_schedule, momentum_schedule
from hnmix.train.step import TrainStep
from hnmix.train.state import (
    checkpoint_to_resume,
    load_training_state,
    save_training_state,
)
from hnmix.train.summary import print_summary

logger = get_logger("hnmix")
HUB_WAIT_S = 900  # the end of training waits this long for the last upload
HUB_WAIT_ON_STOP_S = 60  # a run stopped by a signal (preemption grace periods are short)


def check_bad_fraction(bad: int, seen: int, max_bad_fraction: float, dataset_size: int) -> None:
    """Stop when too many images were unreadable; judged once enough were read to tell (the whole
    dataset, or 1000 images), so that one bad file in the first batch does not end a run."""
    if seen >= min(dataset_size, 1000) and bad / seen > max_bad_fraction:
        raise DataError(f"{bad} of the {seen} images read so far could not be read ({bad / seen:.1%} > "
                        f"--max_bad_fraction {max_bad_fraction}); fix or remove them, or raise --max_bad_fraction")


def train(config: TrainConfig) -> int:
    """Train as `config` says; returns 0, or EXIT_STOPPED after a signal and a checkpoint."""
    follow_the_launcher()
    deadline = stop_deadline()
    if config.deterministic:
        use_deterministic_algorithms()
    accelerator = make_accelerator(config)
    torch.backends.cudnn.benchmark = cudnn_benchmark_on(config, accelerator.device)
    quiet_other_processes(accelerator)
    dir_out = Path(config.dir_out)
    check_views_fit_in_memory(config, accelerator.device)
    check_writable(dir_out)
    config = check_options(config, accelerator.num_processes)
    checkpoint = checkpoint_to_resume(config, accelerator.num_processes)
    prepare_dir_out(config, accelerator, resuming=checkpoint is not None)
    pusher = start_hub_pusher(config, accelerator)

    on_accelerator = augment_on_accelerator(config, accelerator.device)
    loader, has_labels = build_data(config, accelerator, photometric_in_workers=not on_accelerator)
    photometric = (StepPhotometric(config.img_size, seed=config.seed, rank=accelerator.process_index,
                                   augmentation=config.augmentation)
                   if on_accelerator else None)
    monitor = build_knn_monitor(config, accelerator)
    loader = accelerator.prepare(loader)
    steps_per_epoch = len(loader)  # this process's share
    eval_every = eval_every_steps(config, steps_per_epoch=steps_per_epoch)
    model = build_model(config, resolve_curriculum(config, steps_per_epoch, resuming=checkpoint is not None))
    if warning := shuffle_bn_warning(model, accelerator.num_processes):
        logger.warning(warning)
    optimizer = build_optimizer(config, model.encoder_q, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    moco: MoCo = accelerator.unwrap_model(model)
    step_model = compile_step(model, config.compile_mode) if config.compile else model
    momentum_at = momentum_schedule(config)
    guard = NonFiniteGuard(optimizer, config.max_nonfinite_steps, device=accelerator.device)

    metrics_path = dir_out / "metrics.jsonl"
    window, bad_images = StatsWindow(), RunningCount()
    step = load_training_state(accelerator, checkpoint, window, bad_images, guard, metrics_path) if checkpoint else 0
    train_step = TrainStep(step_model, moco, accelerator, optimizer, scheduler, guard, window, bad_images, momentum_at,
                           config.clip_grad, photometric=photometric, has_labels=has_labels)
    first_step, run_started = step, time.perf_counter()
    if accelerator.is_main_process:
        (dir_out / CONFIG_FILE).write_text(config_to_yaml(config))
    # Trackers take scalars (TensorBoard's hparams refuse lists such as crop_scale's).
    accelerator.init_trackers("hnmix", config={k: str(v) if v is None or isinstance(v, list) else v
                                               for k, v in config.to_dict().items()})
    if accelerator.trackers:
        logger.info(f"Trackers write: {'; '.join(tracker_locations(accelerator))}")
    if math.isfinite(deadline.seconds):
        logger.info(f"On a stop signal, {deadline.imposed_by} leaves {deadline.seconds:.0f} s to finish the step and save")

    global_batch = config.batch_size * accelerator.num_processes
    end = config.stop_at or config.steps
    logger.info(f"Training {config.arch} on {config.dataset} ({steps_per_epoch} steps per epoch) with "
                f"{accelerator.num_processes} process(es) on {describe_device(accelerator)}, "
                f"global batch {global_batch}, "
                f"mixed precision {accelerator.mixed_precision}, photometric augmentation on "
                f"{'the accelerator' if photometric else 'the CPU workers'}, deterministic algorithms "
                f"{'on' if torch.are_deterministic_algorithms_enabled() else 'off'}, from step {step} to {end} of {config.steps}")
    results: dict = {"global_batch": global_batch}
    saved = checkpoint
    progress = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}  lr {task.fields[lr]}  kNN {task.fields[knn]}"),
        TimeRemainingColumn(), console=console, disable=not accelerator.is_main_process,
    )
    task = progress.add_task("train", total=config.steps, completed=step, speed="-", loss="-", lr="-", knn="-")
    window_start, window_steps = time.perf_counter(), 0
    stopping = deadline_warned = False
    final_record = None

    if config.eval_at_start and monitor and step == 0:
        untrained = evaluate_without_stopping(monitor, moco, accelerator, 0)
        log_step(accelerator, {"step": 0, "epoch": 0, "steps_per_epoch": steps_per_epoch} | untrained, metrics_path,
                 progress, task)
        window_start = time.perf_counter()  # images/s counts training only
    model.train()
    with progress, StopSignal() as stop:
        while step < end and not stopping:
            epoch, skip = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            for view_q, view_k, ids, labels, unreadable in accelerator.skip_first_batches(loader, skip) if skip else loader:
                step_started = time.perf_counter()
                if config.compile:
                    torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs' outputs of the last step are spent
                train_step(view_q, view_k, ids, labels, unreadable, step)
                step += 1
                window_steps += 1
                progress.update(task, completed=step)
                step_s = time.perf_counter() - step_started

                record = {}
                if monitor and step % eval_every == 0 and step < config.steps:  # the last comes after the save
                    evaluation_started = time.perf_counter()
                    record = evaluate_without_stopping(monitor, moco, accelerator, step)
                    results |= card_results(record)
                    window_start += time.perf_counter() - evaluation_started  # images/s counts training only
                # Not at --stop_at: its window goes into the checkpoint, so a resumed run logs as an
                # uninterrupted one would.
                if step % config.steps_print == 0 or step == config.steps:
                    record |= {"lr": scheduler.get_last_lr()[0],
                               "images_per_s": global_batch * window_steps / (time.perf_counter() - window_start)}
                    record |= window.mean_over_processes(accelerator)
                    if accelerator.device.type == "cuda":  # a host-side counter: no synchronisation
                        record["memory_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                    record["bad_samples"] = bad_images.total(accelerator)
                    record["skipped_steps"] = guard.check(step, saved)
                    record |= dict(zip(("s1_in_use", "s2_in_use"), moco.mixing_sizes(step - 1)))
                    check_bad_fraction(record["bad_samples"], step * global_batch, config.max_bad_fraction,
                                       len(loader.dataset))
                    window_start, window_steps = time.perf_counter(), 0
                if record and step == config.steps:
                    final_record = {"step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch} | record  # logged with the final evaluation
                elif record:
                    log_step(accelerator, {"step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch} | record, metrics_path, progress, task)
                stopping = stop.requested()
                if step % config.steps_save == 0 or step == end or stopping:
                    guard.check(step, saved)  # a diverged run is never saved
                    save_started = time.perf_counter()
                    saved = save_training_state(accelerator, moco, window, bad_images, guard, config, step, epoch)
                    if stopping and accelerator.is_main_process:  # first: a launcher's SIGKILL may follow soon
                        write_stopped_marker(dir_out, cause=stop_cause(stop), step=step, checkpoint=saved)
                    deadline_warned = deadline_warned or deadline.warn_if_too_short(
                        step_s, time.perf_counter() - save_started, stop.agree_s)
                    if accelerator.is_main_process:
                        refresh_curves(dir_out)
                    if pusher and step < end and not stopping:
                        pusher.on_save(step, encoder_dir=publish_encoder(config, moco, results, step), checkpoint_dir=saved)
                if step >= end or stopping:
                    break

    # The checkpoint and the export come first: an evaluation that fails costs no training.
    if accelerator.is_main_process:
        encoder_dir = publish_encoder(config, moco, results, step)
        loading = (f"hnmix.load_encoder('{encoder_dir}')" if config.stem == "cifar"  # timm cannot rebuild that stem
                   else f"timm.create_model('local-dir:{encoder_dir}', pretrained=True)")
        logger.info(f"Exported the encoder to {encoder_dir}: {loading}")
    if final_record is not None:
        if monitor:
            final_record |= evaluate_without_stopping(monitor, moco, accelerator, step)
            results |= card_results(final_record)
        log_step(accelerator, final_record, metrics_path, progress, task)
        if monitor and accelerator.is_main_process:
            publish_encoder(config, moco, results, step)  # the card with the final kNN
    if accelerator.is_main_process:
        refresh_curves(dir_out)  # with the final record
        copy_curves(dir_out, encoder_dir)
        if pusher and not stopping:
            pusher.on_train_end(step, encoder_dir=encoder_dir, checkpoint_dir=saved)
        if pusher:
            timeout = hub_wait_on_stop(stop, deadline) if stopping else HUB_WAIT_S
            logger.info(f"Waiting up to {timeout:.0f} s for the upload to {config.hub_model_id}")
            pusher.wait(timeout=timeout)
        print_summary(console, dir_out=dir_out, first_step=first_step, last_step=step, total_steps=config.steps,
                      wall_s=time.perf_counter() - run_started, global_batch=global_batch, checkpoint=saved,
                      encoder_dir=encoder_dir, hub_model_id=config.hub_model_id if pusher else None, stopped=stopping)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stopping:
        logger.warning(f"Stopped by {stop_cause(stop)} after step {step}, saved in {saved}; continue with --resume latest")
        return EXIT_STOPPED
    return 0


def evaluate_without_stopping(monitor: KnnMonitor, moco: MoCo, accelerator: Accelerator, step: int) -> dict:
    """The kNN monitor's record at `step`; an error inside it becomes one warning and a
    `knn_error` entry in the record, never the end of the run."""
    try:
        return monitor.evaluate(monitor.network_of(moco.encoder_q), accelerator)
    except Exception as error:  # noqa: BLE001 - an evaluation must never cost the training
        line = first_line(error) if isinstance(error, HnmixError) else describe(error)
        logger.warning(f"The kNN evaluation at step {step} failed ({line}); training goes on without it")
        return {"knn_error": line}


def card_results(record: dict) -> dict:
    """What the model card takes from a record with a kNN result: its knn_* entries, and the
    split they were measured on as `eval_split`."""
    results = {key: value for key, value in record.items() if key.startswith("knn_")}
    if "knn_split" in record:
        results["eval_split"] = record["knn_split"]
    return results


def stop_cause(stop: StopSignal) -> str:
    return stop.received.name if stop.received else "a signal on another rank"


def hub_wait_on_stop(stop: StopSignal, deadline: StopDeadline) -> float:
    """How long a run stopped by a signal waits for its last upload: HUB_WAIT_ON_STOP_S, less when
    its launcher would SIGKILL the process sooner (5 s kept for the exit)."""
    elapsed = time.monotonic() - (stop.received_at or time.monotonic())
    return max(0.0, min(HUB_WAIT_ON_STOP_S, deadline.seconds - elapsed - 5))


def log_step(accelerator: Accelerator, record: dict, metrics_path: Path, progress: Progress, task) -> None:
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if not accelerator.is_main_process:
        return
    append_record(metrics_path, record)
    if "loss" in record:
        progress.update(task, speed=f"{record['images_per_s']:.0f}", loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if "knn_top1" in record:
        progress.update(task, knn=f"{record['knn_top1']:.1f}")
    logger.info(format_record(record, progress.tasks[0].total))
    logger.debug(format_details(record))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = parse_config(argv)
        with removed_if_left_empty(Path(config.dir_out)):
            try:
                return train(config)
            except (RuntimeError, MemoryError) as error:  # a failed allocation is one line too
                line = out_of_memory_line(error)
                if line is None:
                    raise
                raise HnmixError(line) from None
    except HnmixError as error:
        report_error(error)
        return 2
