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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

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
from torch.utils.data import DataLoader

from hnmix.data.photometric import StepPhotometric
from hnmix.errors import DataError, HnmixError, describe, first_line
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.hub.pusher import HubPusher
from hnmix.mixing import NEGATIVE_TYPES
from hnmix.moco import MoCo
from hnmix.pictures.curves import METRICS_FILE, copy_curves, refresh_curves
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
    if config.run.deterministic:
        use_deterministic_algorithms()
    accelerator = make_accelerator(config.run)
    torch.backends.cudnn.benchmark = cudnn_benchmark_on(config.run, accelerator.device)
    quiet_other_processes(accelerator)
    dir_out = Path(config.run.dir_out)
    check_views_fit_in_memory(config, accelerator.device)
    check_writable(dir_out)
    config = check_options(config, accelerator.num_processes)
    checkpoint = checkpoint_to_resume(config, accelerator.num_processes)
    prepare_dir_out(config, accelerator, resuming=checkpoint is not None)
    pusher = start_hub_pusher(config.hub, config.run.dir_out, accelerator)

    on_accelerator = augment_on_accelerator(config.data, accelerator.device)
    loader, has_labels = build_data(config, accelerator, photometric_in_workers=not on_accelerator)
    photometric = (StepPhotometric(config.data.img_size, seed=config.run.seed, rank=accelerator.process_index,
                                   augmentation=config.augmentation)
                   if on_accelerator else None)
    monitor = build_knn_monitor(config, accelerator)
    loader = accelerator.prepare(loader)
    steps_per_epoch = len(loader)  # this process's share
    curriculum = resolve_curriculum(config, steps_per_epoch, resuming=checkpoint is not None)
    model = build_model(config.model, config.method, curriculum, seed=config.run.seed)
    if warning := shuffle_bn_warning(model, accelerator.num_processes):
        logger.warning(warning)
    optimizer = build_optimizer(config.optimization, model.encoder_q, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.optimization))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    moco: MoCo = accelerator.unwrap_model(model)
    step_model = compile_step(model, config.run.compile_mode) if config.run.compile else model
    momentum_at = momentum_schedule(config.method, config.optimization.steps)
    guard = NonFiniteGuard(optimizer, config.optimization.max_nonfinite_steps, device=accelerator.device)

    window, bad_images = StatsWindow(), RunningCount()
    step = load_training_state(accelerator, checkpoint, window, bad_images, guard, dir_out / METRICS_FILE) if checkpoint else 0
    train_step = TrainStep(step_model, moco, accelerator, optimizer, scheduler, guard, window, bad_images, momentum_at,
                           config.optimization.clip_grad, photometric=photometric, has_labels=has_labels)
    run_started = time.perf_counter()
    end = config.run.stop_at or config.optimization.steps
    announce(config, accelerator, deadline, steps_per_epoch, on_accelerator=on_accelerator, start=step, end=end)
    run = Run(config, accelerator, moco, monitor, scheduler, guard, window, bad_images, pusher, deadline, loader,
              step=step, saved=checkpoint, started=run_started)
    run.evaluate_at_start()

    model.train()
    with run.progress, StopSignal() as stop:
        record, stopping = {}, False
        for step, (view_q, view_k, ids, labels, unreadable) in run.batches(end):
            step_started = time.perf_counter()
            if config.run.compile:
                torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs' outputs of the last step are spent
            train_step(view_q, view_k, ids, labels, unreadable, step)
            run.stepped(step_started)
            record = run.evaluate_if_due() | run.statistics_if_due()
            stopping = stop.requested()
            if run.step == end or stopping:
                break
            if record:
                run.log(record)
            if run.step % config.run.steps_save == 0:
                run.save(stop)
                run.push()
        # The end: at --steps, --stop_at or a stop signal. The record of --steps waits for the
        # final evaluation, after the save and the export.
        if record and run.step < config.optimization.steps:
            run.log(record)
        if run.step > run.first_step:
            run.save(stop, stopping=stopping)
    return run.finish(record if run.step == config.optimization.steps else {}, stop, stopping)


def announce(config: TrainConfig, accelerator: Accelerator, deadline: StopDeadline, steps_per_epoch: int, *,
             on_accelerator: bool, start: int, end: int) -> None:
    """dir_out/config.yaml, the trackers, and the lines that say where they write, how long a
    stop signal leaves, and what trains where from which step to which."""
    if accelerator.is_main_process:
        (Path(config.run.dir_out) / CONFIG_FILE).write_text(config_to_yaml(config))
    # Trackers take scalars (TensorBoard's hparams refuse lists such as crop_scale's).
    accelerator.init_trackers("hnmix", config={k: str(v) if v is None or isinstance(v, list) else v
                                               for k, v in config.options().items()})
    if accelerator.trackers:
        logger.info(f"Trackers write: {'; '.join(tracker_locations(accelerator))}")
    if math.isfinite(deadline.seconds):
        logger.info(f"On a stop signal, {deadline.imposed_by} leaves {deadline.seconds:.0f} s to finish the step and save")
    logger.info(f"Training {config.model.arch} on {config.data.dataset} ({steps_per_epoch} steps per epoch) with "
                f"{accelerator.num_processes} process(es) on {describe_device(accelerator)}, "
                f"global batch {config.optimization.batch_size * accelerator.num_processes}, "
                f"mixed precision {accelerator.mixed_precision}, photometric augmentation on "
                f"{'the accelerator' if on_accelerator else 'the CPU workers'}, deterministic algorithms "
                f"{'on' if torch.are_deterministic_algorithms_enabled() else 'off'}, "
                f"from step {start} to {end} of {config.optimization.steps}")


@dataclass
class Run:
    """What a run carries from step to step (the step and its epoch, the last checkpoint, the
    model card's results, the images/s window, the progress bar), the cadences the loop runs
    after a step (`evaluate_if_due`, `statistics_if_due`, `log`, `save`, `push`) and the end
    (`finish`). The TrainStep fills `window`; the run reads and saves it."""

    config: TrainConfig
    accelerator: Accelerator
    moco: MoCo
    monitor: Optional[KnnMonitor]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: NonFiniteGuard
    window: StatsWindow
    bad_images: RunningCount
    pusher: Optional[HubPusher]
    deadline: StopDeadline
    loader: DataLoader  # prepared by the accelerator
    step: int  # the steps done
    saved: Optional[Path]  # the last checkpoint
    started: float  # time.perf_counter() at the start of the run

    def __post_init__(self) -> None:
        self.dir_out = Path(self.config.run.dir_out)
        self.first_step, self.epoch, self.step_s, self.deadline_warned = self.step, 0, 0.0, False
        self.steps_per_epoch = len(self.loader)  # this process's share
        self.eval_every = eval_every_steps(self.config, steps_per_epoch=self.steps_per_epoch)
        self.global_batch = self.config.optimization.batch_size * self.accelerator.num_processes
        self.results: dict = {"global_batch": self.global_batch}
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}  lr {task.fields[lr]}  kNN {task.fields[knn]}"),
            TimeRemainingColumn(), console=console, disable=not self.accelerator.is_main_process)
        self.task = self.progress.add_task("train", total=self.config.optimization.steps, completed=self.step,
                                           speed="-", loss="-", lr="-", knn="-")
        self.window_start, self.window_steps = time.perf_counter(), 0  # of images/s

    def batches(self, end: int) -> Iterator[tuple[int, tuple]]:
        """(step, batch) from the run's step on, epoch after epoch, while the step is before `end`
        (the caller counts the steps, `stepped`); a resumed epoch skips the batches it trained on."""
        while self.step < end:
            self.epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.loader.set_epoch(self.epoch)
            for batch in self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader:
                yield self.step, batch

    def stepped(self, started: float) -> None:
        """Count the step that began at `started` (time.perf_counter())."""
        self.step += 1
        self.window_steps += 1
        self.progress.update(self.task, completed=self.step)
        self.step_s = time.perf_counter() - started

    def evaluate_at_start(self) -> None:
        """With --eval_at_start, a fresh run's first record: the untrained network's kNN at step 0."""
        if self.config.evaluation.eval_at_start and self.monitor and self.step == 0:
            self.log(evaluate_without_stopping(self.monitor, self.moco, self.accelerator, 0))
            self.window_start = time.perf_counter()  # images/s counts training only

    def evaluate_if_due(self) -> dict:
        """The kNN record every eval_every steps before --steps (the final one comes after the save)."""
        if not (self.monitor and self.step % self.eval_every == 0 and self.step < self.config.optimization.steps):
            return {}
        evaluation_started = time.perf_counter()
        record = evaluate_without_stopping(self.monitor, self.moco, self.accelerator, self.step)
        self.results |= card_results(record)
        self.window_start += time.perf_counter() - evaluation_started  # images/s counts training only
        return record

    def statistics_if_due(self) -> dict:
        """Every steps_print steps and at --steps: the window's means (emptying it), images/s and
        the counters. Not at --stop_at: its window goes into the checkpoint, so a resumed run logs
        as an uninterrupted one would. Every rank calls it."""
        config, accelerator = self.config, self.accelerator
        if not (self.step % config.run.steps_print == 0 or self.step == config.optimization.steps):
            return {}
        record = {"lr": self.scheduler.get_last_lr()[0],
                  "images_per_s": self.global_batch * self.window_steps / (time.perf_counter() - self.window_start)}
        record |= self.window.mean_over_processes(accelerator)
        if accelerator.device.type == "cuda":  # a host-side counter: no synchronisation
            record["memory_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        record["bad_samples"] = self.bad_images.total(accelerator)
        record["skipped_steps"] = self.guard.check(self.step, self.saved)
        record |= {f"{t.size}_in_use": n for t, n in zip(NEGATIVE_TYPES.values(), self.moco.mixing_sizes(self.step - 1))}
        check_bad_fraction(record["bad_samples"], self.step * self.global_batch, config.data.max_bad_fraction,
                           len(self.loader.dataset))
        self.window_start, self.window_steps = time.perf_counter(), 0
        return record

    def log(self, record: dict) -> None:
        """This step's `record` to the trackers, metrics.jsonl, the progress bar and the log."""
        record = {"step": self.step, "epoch": self.epoch, "steps_per_epoch": self.steps_per_epoch} | record
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if not self.accelerator.is_main_process:
            return
        append_record(self.dir_out / METRICS_FILE, record)
        if "loss" in record:
            self.progress.update(self.task, speed=f"{record['images_per_s']:.0f}", loss=f"{record['loss']:.4f}",
                                 lr=f"{record['lr']:.2e}")
        if "knn_top1" in record:
            self.progress.update(self.task, knn=f"{record['knn_top1']:.1f}")
        logger.info(format_record(record, self.progress.tasks[0].total))
        logger.debug(format_details(record))

    def save(self, stop: StopSignal, *, stopping: bool = False) -> None:
        """A checkpoint of every rank (never of a diverged run), STOPPED first after a stop signal
        (a launcher's SIGKILL may follow soon), then the curves; warns once when a step plus a
        save would not fit in the launcher's deadline. Every rank calls it."""
        self.guard.check(self.step, self.saved)
        save_started = time.perf_counter()
        self.saved = save_training_state(self.accelerator, self.moco, self.window, self.bad_images, self.guard,
                                         self.config, self.step, self.epoch)
        if stopping and self.accelerator.is_main_process:
            write_stopped_marker(self.dir_out, cause=stop_cause(stop), step=self.step, checkpoint=self.saved)
        self.deadline_warned = self.deadline_warned or self.deadline.warn_if_too_short(
            self.step_s, time.perf_counter() - save_started, stop.agree_s)
        if self.accelerator.is_main_process:
            refresh_curves(self.dir_out)

    def push(self) -> None:
        """The encoder and the checkpoint just saved to the Hub, in the background."""
        if self.pusher:
            self.pusher.on_save(self.step, encoder_dir=publish_encoder(self.config, self.moco, self.results, self.step),
                                checkpoint_dir=self.saved)

    def finish(self, final_record: dict, stop: StopSignal, stopping: bool) -> int:
        """After the last save: the export, the final evaluation (one that fails costs no
        training) into `final_record`, curves, the last upload, the summary; returns the exit code."""
        config, accelerator = self.config, self.accelerator
        encoder_dir = self.export() if accelerator.is_main_process else None
        if final_record:
            if self.monitor:
                final_record |= evaluate_without_stopping(self.monitor, self.moco, accelerator, self.step)
                self.results |= card_results(final_record)
            self.log(final_record)
            if self.monitor and accelerator.is_main_process:
                publish_encoder(config, self.moco, self.results, self.step)  # the card with the final kNN
        if accelerator.is_main_process:
            refresh_curves(self.dir_out)  # with the final record
            copy_curves(self.dir_out, encoder_dir)
            if self.pusher and not stopping:
                self.pusher.on_train_end(self.step, encoder_dir=encoder_dir, checkpoint_dir=self.saved)
            if self.pusher:
                timeout = hub_wait_on_stop(stop, self.deadline) if stopping else HUB_WAIT_S
                logger.info(f"Waiting up to {timeout:.0f} s for the upload to {config.hub.hub_model_id}")
                self.pusher.wait(timeout=timeout)
            print_summary(console, dir_out=self.dir_out, first_step=self.first_step, last_step=self.step,
                          total_steps=config.optimization.steps, wall_s=time.perf_counter() - self.started,
                          global_batch=self.global_batch, checkpoint=self.saved, encoder_dir=encoder_dir,
                          hub_model_id=config.hub.hub_model_id if self.pusher else None, stopped=stopping)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if stopping:
            logger.warning(f"Stopped by {stop_cause(stop)} after step {self.step}, saved in {self.saved}; "
                           "continue with --resume latest")
            return EXIT_STOPPED
        return 0

    def export(self) -> Path:
        """The encoder with its model card to dir_out/encoder (main process); the line says how to load it."""
        encoder_dir = publish_encoder(self.config, self.moco, self.results, self.step)
        loading = (f"hnmix.load_encoder('{encoder_dir}')" if self.config.model.stem == "cifar"  # timm cannot rebuild that stem
                   else f"timm.create_model('local-dir:{encoder_dir}', pretrained=True)")
        logger.info(f"Exported the encoder to {encoder_dir}: {loading}")
        return encoder_dir


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = parse_config(argv)
        with removed_if_left_empty(Path(config.run.dir_out)):
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
