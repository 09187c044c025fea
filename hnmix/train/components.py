"""The parts of a run, built from its `TrainConfig`, and the checks made before any compute.

The Accelerator, logging, the training data, the kNN monitor, the model and the Hub pusher; the
checks of dir_out, arch and trackers. `hnmix.train.loop.train` calls them in order.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from datetime import timedelta
from difflib import get_close_matches
from pathlib import Path
from typing import Iterator, Optional

import psutil
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import (
    Accelerator,
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
)
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, broadcast_object_list, set_seed
from rich.console import Console
from rich.logging import RichHandler

from hnmix.backbones import apply_resnet_init, resnet_init_problem, stem_problem
from hnmix.data.decoded import GIB
from hnmix.data.sources import load_image_dataset, resolve_columns
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import TwoViewDataset, make_train_loader
from hnmix.data.workers import fit_prefetch, local_processes, workers_per_process
from hnmix.distributed import world_size_and_rank
from hnmix.errors import ConfigError, DataError, HubError, describe, first_line
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.evaluate.splits import NO_LABELS, load_eval_splits
from hnmix.hub.card import write_model_card
from hnmix.hub.export import export_encoder
from hnmix.hub.pusher import HubPusher
from hnmix.mixing import NEGATIVE_TYPES
from hnmix.moco import MoCo, MoCoEncoder
from hnmix.pictures.curves import copy_curves
from hnmix.train.checkpoints import checkpoints_root, complete_checkpoints
from hnmix.train.config import (
    DataConfig,
    HubConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    RunConfig,
    TrainConfig,
    curriculum_problem,
    curriculum_steps,
    knn_monitor_on,
    negative_counts,
)
from hnmix.train.log_lines import DropRankTag
from hnmix.train.optim import make_optimizer
from hnmix.train.preemption import STOPPED_MARKER

logger = get_logger("hnmix")
# A collective that waits longer than this means a rank is gone: fail then rather than after the
# backend's default. Long enough for checkpoint saves and kNN evaluations; the data preparation,
# which may take hours the first time, waits apart (`main_process_prepares_first`).
COLLECTIVE_TIMEOUT_S = 1200
# Not a terminal: 160 columns, unless COLUMNS says otherwise.
console = Console(stderr=True, width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 160)


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"dir_out {directory} is not writable ({error.strerror or error}); "
                          "choose another --dir_out") from None


@contextmanager
def removed_if_left_empty(directory: Path) -> Iterator[None]:
    """On an exception inside, remove `directory` and the parents of it that did not exist
    before, where they are still empty: a run that fails before writing anything leaves no
    folder it created. Only the main process (RANK 0) removes."""
    created = [path for path in (directory, *directory.parents) if not path.exists()]
    try:
        yield
    except BaseException:
        if os.environ.get("RANK", "0") == "0":
            for path in created:  # deepest first
                try:
                    path.rmdir()
                except OSError:  # not empty, or never made
                    break
        raise


# What a run writes into dir_out (besides the checkpoints it resumes from).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.yaml", "encoder", "curves.png")


def run_outputs(directory: Path) -> list[str]:
    """The names of the RUN_OUTPUTS in `directory` (an empty checkpoints/ does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = directory / name
        if path.is_dir() and name == "checkpoints" and not any(path.iterdir()):
            continue
        if path.exists():
            found.append(name)
    return found


def holds_a_run(directory: Path) -> bool:
    """Whether `directory` holds a run worth keeping: a complete checkpoint to continue, or an
    exported encoder. Without either, its other outputs (config.yaml, metrics.jsonl, a
    checkpoint whose save never finished) are the leftovers of a run that failed or was killed
    before its first checkpoint."""
    return bool(complete_checkpoints(checkpoints_root(directory))) or (directory / "encoder").exists()


def prepare_dir_out(config: TrainConfig, accelerator: Accelerator, *, resuming: bool) -> None:
    """Before any compute: a fresh run (no checkpoint to resume) never writes over another run.
    It is refused when dir_out holds one, unless --overwrite_dir_out (the old outputs are removed
    first, as transformers' --overwrite_output_dir) or --resume auto found no checkpoint (a
    requeued run that never saved: its partial records are removed). Snapshots of Hub uploads
    left by a crash (`.hub-staging`, hard links to pruned checkpoints) and the STOPPED marker of
    a signal stop are removed in any case.
    A dir_out whose outputs are only the leftovers of a run that stopped before its first
    checkpoint (`holds_a_run` is False) is no run: a fresh run removes them and starts.
    Every rank checks; the main process removes, and the others wait for it."""
    dir_out = Path(config.run.dir_out)
    found = [] if resuming else run_outputs(dir_out)
    if found and holds_a_run(dir_out) and not (config.run.overwrite_dir_out or config.run.resume == "auto"):
        raise ConfigError(f"dir_out {dir_out} already holds a run ({', '.join(found)}); continue it with "
                          "--resume latest (or --resume auto), choose another --dir_out, or pass --overwrite_dir_out "
                          "to delete it and start afresh")
    if accelerator.is_main_process:
        for name in [*found, ".hub-staging", STOPPED_MARKER]:
            path = dir_out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if found:
            reason = ("--overwrite_dir_out" if config.run.overwrite_dir_out else "--resume auto found no checkpoint"
                      if config.run.resume == "auto" else "the run that wrote them stopped before its first checkpoint")
            logger.warning(f"Removed the previous run's {', '.join(found)} from {dir_out} ({reason})")
    accelerator.wait_for_everyone()


def check_arch(arch: str, stem: str = "default", resnet_init: str = "timm") -> None:
    """A one-line ConfigError for an unknown timm model, or one that cannot take `stem` or
    `resnet_init` (`hnmix.backbones.stem_problem`, `resnet_init_problem`: built on the meta
    device, nothing computed)."""
    if ":" not in arch and not timm.is_model(arch):  # hf-hub:/local-dir: names are resolved by timm itself
        close = get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"option arch: unknown timm model {arch!r}{hint}")
    problem = stem_problem(arch, stem)
    if problem:
        raise ConfigError(f"option stem {stem}: {problem}")
    problem = resnet_init_problem(arch, resnet_init)
    if problem:
        raise ConfigError(problem)


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


PREPARATION_TIMEOUT = timedelta(days=2)  # the first download and preparation of a large Hub dataset


@contextmanager
def main_process_prepares_first(accelerator: Accelerator) -> Iterator[None]:
    """Like `accelerator.main_process_first()`, but the other ranks wait in a barrier of a gloo
    group of its own, whose timeout is PREPARATION_TIMEOUT, not the training collectives' 20
    minutes: the main process downloads and prepares the data (into the shared cache) while they
    wait, however long that takes; then they load it from the cache."""
    group = None
    if accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    if group is not None and not accelerator.is_main_process:
        dist.barrier(group=group)
    yield
    if group is not None and accelerator.is_main_process:
        dist.barrier(group=group)
    if group is not None:
        dist.destroy_process_group(group)


def use_deterministic_algorithms() -> None:
    """torch's deterministic mode for --deterministic: deterministic kernels wherever torch has them
    (among them `scatter_add_`, which the mixing backward and the kNN vote use, and cuDNN's
    convolutions) and an error where it has none; cuBLAS needs its workspace configured before
    its first call."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def cudnn_benchmark_on(run: RunConfig, device: torch.device) -> bool:
    """Whether cuDNN times its convolution algorithms for each new shape and keeps the fastest
    (`torch.backends.cudnn.benchmark`): on a CUDA device, where a step's shapes are the same every
    step, unless --deterministic (the fastest algorithm may differ between runs)."""
    return device.type == "cuda" and not run.deterministic


def make_accelerator(run: RunConfig) -> Accelerator:
    if run.device not in (None, "cpu"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("option device selects a GPU for one process only; "
                              "under accelerate launch use its --gpu_ids")
        os.environ["CUDA_VISIBLE_DEVICES"] = run.device
    trackers = requested_trackers(run.report_to)
    # torch 2.14 renames the option; Accelerate's kwargs handler only knows the old name, which
    # keeps its meaning (no buffer broadcast in forward; every rank builds identical buffers).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    try:
        accelerator = Accelerator(
            mixed_precision=run.mixed_precision,
            cpu=run.device == "cpu",
            log_with=trackers or None,
            project_dir=run.dir_out,
            step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not samples
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                             InitProcessGroupKwargs(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))],
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
    except (ValueError, ImportError) as error:
        raise ConfigError(f"cannot set up Accelerate: {str(error).splitlines()[0]}") from None
    if run.device not in (None, "cpu") and accelerator.device.type == "cpu":
        raise ConfigError(f"option device={run.device} selects a GPU, but there is no GPU {run.device} here "
                          "(torch sees no CUDA device); pass --device cpu to train on the CPU, or leave --device out")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate accepts it there but neither autocasts nor scales: the run would be float32.
        raise ConfigError("option mixed_precision=fp16 needs a GPU: on the CPU Accelerate trains in float32, "
                          "without autocast or loss scaling; pass --mixed_precision bf16 (or no) on the CPU")
    return accelerator


def describe_device(accelerator: Accelerator) -> str:
    """Where the run trains, for the start line: `cpu`, `cuda:0`, or `cuda` (one device each)
    for several processes."""
    if accelerator.num_processes > 1 and accelerator.device.type != "cpu":
        return f"{accelerator.device.type} (one device each)"
    return str(accelerator.device)


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """The memory of `device`: a CUDA GPU's, the host's physical memory for the CPU, else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return psutil.virtual_memory().total
    return None


def check_views_fit_in_memory(config: TrainConfig, device: torch.device) -> None:
    """Refuse an --img_size (with --batch_size) whose two views of one batch as the encoders take
    them, [2, batch_size, 3, img_size, img_size] float32, exceed the memory of the device that
    trains: the least a step holds, so the run could only end in an allocation failure."""
    batch, size = config.optimization.batch_size, config.data.img_size
    needed = 2 * batch * 3 * size**2 * 4
    memory = device_memory_bytes(device)
    if memory is not None and needed > memory:
        raise ConfigError(f"option img_size={size}: the two views of one batch of {batch} alone need"
                          f" {needed / 2**30:,.1f} GiB as float32, more than the {memory / 2**30:,.1f} GiB of "
                          f"memory on {device}; lower --img_size (the papers use 224) or --batch_size")


_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
_TORCH_PREFIX = re.compile(r"^(\w+Error: )?(\[enforce fail at [^\]]*\] err == 0\. )?")


def out_of_memory_line(error: BaseException) -> Optional[str]:
    """The one line for a failed allocation (torch's CPU allocator, CUDA's out of memory, a
    MemoryError), also when it happened in a DataLoader worker and arrives with the worker's
    traceback in its message; None for any other error."""
    if isinstance(error, MemoryError):
        what = describe(error)
    elif isinstance(error, torch.OutOfMemoryError) or _OUT_OF_MEMORY.search(str(error)):
        lines = [line.strip() for line in str(error).splitlines() if _OUT_OF_MEMORY.search(line)]
        what = _TORCH_PREFIX.sub("", lines[-1] if lines else first_line(error))
        what = what if len(what) <= 200 else what[:197] + "..."
    else:
        return None
    return f"not enough memory ({what}); lower --img_size or --batch_size, or choose a smaller --arch"


def quiet_other_processes(accelerator: Accelerator) -> None:
    import datasets
    import huggingface_hub

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-save INFO lines drown ours
    if accelerator.is_main_process:
        handler = RichHandler(console=console, show_path=False)
        if accelerator.num_processes == 1:
            handler.addFilter(DropRankTag())
        logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]", handlers=[handler], force=True)
        datasets.logging.set_verbosity_warning()
    else:
        logging.basicConfig(level=logging.ERROR, force=True)
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


def augment_on_accelerator(data: DataConfig, device: torch.device) -> bool:
    """`--augment_device`, resolved for the accelerator `device`: its default is the accelerator
    when that is a GPU."""
    if data.augment_device is None:
        return device.type != "cpu"
    return data.augment_device == "accelerator"


def loader_workers(data: DataConfig, accelerator: Accelerator) -> tuple[int, str]:
    """(DataLoader workers per process, how that was chosen): --num_workers, or when it is left
    out this process's share of the node's cores (`hnmix.data.workers.workers_per_process`)."""
    return workers_per_process(data.num_workers, accelerator.num_processes)


def build_data(config: TrainConfig, accelerator: Accelerator, *, photometric_in_workers: bool):
    """The training DataLoader and whether the data has labels. The workers crop and flip, and
    run the photometric half too when `photometric_in_workers`, as the augmentation options say
    (`TrainConfig.augmentation`; the batched half gets the same spec in the loop)."""
    data, augmentation, seed, batch = config.data, config.augmentation, config.run.seed, config.optimization.batch_size
    with main_process_prepares_first(accelerator):
        dataset = load_image_dataset(data.dataset, split=data.split, cache_dir=data.dir_data, seed=seed,
                                     synthetic_size=data.synthetic_size)
    image_column, label_column = resolve_columns(dataset, data.image_column, data.label_column)
    logger.info(f"Augmentation: {augmentation.describe()}")
    photometric = moco_v2_photometric(data.img_size, augmentation) if photometric_in_workers else None
    views = TwoViewDataset(dataset, image_column=image_column, label_column=label_column, img_size=data.img_size,
                           seed=seed, photometric=photometric, augmentation=augmentation,
                           in_memory_bytes=int(data.images_in_memory_gib * GIB))
    workers, chosen_by = loader_workers(data, accelerator)
    prefetch, ready = None, "loading in the main process"
    if workers:  # every process of the node has its loader in the same /dev/shm; refused before any worker starts
        fit = fit_prefetch(views.batch_bytes(batch), workers, processes=local_processes(accelerator.num_processes))
        prefetch, ready = fit.prefetch_factor, fit.describe()
    logger.info(f"DataLoader: {workers} worker(s) per process ({chosen_by}), {ready}")
    loader = make_train_loader(views, batch_size=batch, num_workers=workers, seed=seed, prefetch_factor=prefetch)
    return loader, label_column is not None


def held_out_size(eval_split_size: float) -> float | int:
    """--eval_split_size as `load_eval_splits` takes it: a fraction below 1, else a whole count
    (the option is a float, so a count arrives as e.g. 16.0)."""
    return int(eval_split_size) if eval_split_size >= 1 else eval_split_size


def build_knn_monitor(config: TrainConfig, accelerator: Accelerator) -> Optional[KnnMonitor]:
    """The kNN monitor, or None when off or the data has no labels: its queries are --knn_split
    (with the whole --split as bank), else the held-out split; it compares --knn_features. Its
    images are centre-cropped by --eval_crop_pct and normalised as the training views are
    (--normalize: the statistics the encoder learns with)."""
    if not knn_monitor_on(config):
        return None
    data, evaluation = config.data, config.evaluation
    try:
        with main_process_prepares_first(accelerator):
            splits = load_eval_splits(
                data.dataset, split=data.split, image_column=data.image_column, label_column=data.label_column,
                eval_split_size=held_out_size(evaluation.eval_split_size),
                max_samples=evaluation.eval_max_samples or None, seed=config.run.seed, cache_dir=data.dir_data,
                synthetic_size=data.synthetic_size, held_out_split=evaluation.knn_split)
    except DataError as error:
        if evaluation.knn_split is not None and str(error).startswith(f"split {evaluation.knn_split!r} does not exist"):
            raise ConfigError(f"option knn_split: {error}") from None
        if str(error) != NO_LABELS:
            raise
        logger.warning("The dataset has no labels: training without the kNN monitor")
        return None
    every = evaluation.eval_every
    cadence = f"{every[:-2]} epoch(s)" if every.endswith("ep") else f"{every} steps"
    logger.info(f"kNN monitor of the {evaluation.knn_features} features every {cadence}: {splits.describe()}")
    return KnnMonitor.from_splits(splits, accelerator, img_size=data.img_size,
                                  batch_size=config.optimization.batch_size,
                                  num_workers=loader_workers(data, accelerator)[0], k=evaluation.knn_k,
                                  temperature=evaluation.knn_temperature, features=evaluation.knn_features,
                                  mean=config.augmentation.mean, std=config.augmentation.std,
                                  crop_pct=evaluation.eval_crop_pct)


def resolve_lr(config: TrainConfig, num_processes: int) -> TrainConfig:
    """`config` with lr_base = lr_per_256 x global batch / 256 when --lr_per_256 is given (logged)."""
    per_256 = config.optimization.lr_per_256
    if per_256 is None:
        return config
    global_batch = config.optimization.batch_size * num_processes
    lr_base = per_256 * global_batch / 256
    logger.info(f"Peak learning rate {lr_base:g} = lr_per_256 {per_256:g} x global batch {global_batch} / 256")
    return config.with_options(lr_base=lr_base)


def resolve_curriculum(config: TrainConfig, steps_per_epoch: int, *, resuming: bool) -> tuple[int, ...]:
    """The first step of each negative type, in the registry's order. A type asked for (s > 0)
    that would start at or after the last step is refused with one line, or only warned about
    when a resumed run's new --steps moved the end before it."""
    starts = curriculum_steps(config.method, steps_per_epoch=steps_per_epoch)
    for kind, step in zip(NEGATIVE_TYPES.values(), starts):
        problem = curriculum_problem(config.method, config.optimization.steps, kind, step)
        if problem and not resuming:
            raise ConfigError(problem)
        if problem:
            logger.warning(problem.replace("option ", "After the change of --steps, option ", 1))
    return starts


def negatives_used(moco: MoCo, steps_trained: int) -> dict[str, Optional[int]]:
    """The first step at which each synthetic type was used in the `steps_trained` steps so far,
    None for a type never used: what the model card and the summary report."""
    def first(size: int, start: int) -> Optional[int]:
        return start if size and start < steps_trained else None

    return {f"{t.name}_from": first(moco.counts[t.count_option], moco.starts[t.start_option])
            for t in NEGATIVE_TYPES.values()}


def build_model(model: ModelConfig, method: MethodConfig, curriculum: tuple[int, ...], *, seed: int) -> MoCo:
    """The MoCo model of these options, identical on every rank; `curriculum`: the first step of each
    negative type, in the registry's order (`resolve_curriculum`). Eager: --compile compiles the prepared model
    (`compile_step`).

    The global RNGs (torch, numpy, random) are seeded with `seed` on every rank for the build,
    then with seed + rank (as Accelerate's `set_seed(device_specific=True)`, which needs an
    Accelerator; `hnmix.bench` builds without one) for training: stochastic layers (dropout,
    drop-path) draw their own masks on each rank, and each rank's stream resumes from its RNG
    file in a checkpoint. The queue's initial keys come from a generator of their own."""
    set_seed(seed)  # the same initial weights on every rank
    encoder = MoCoEncoder(model.arch, model.dim_moco, stem=model.stem, head=model.head)
    apply_resnet_init(encoder.backbone, model.resnet_init, arch=model.arch)
    moco = MoCo(
        encoder, dim_moco=model.dim_moco, k_moco=method.k_moco, m_moco=method.m_moco, t_moco=method.t_moco,
        n_hard=method.n_hard, bn_splits=method.bn_splits, symmetric=method.symmetric, seed=seed,
        **negative_counts(method), **{t.start_option: start for t, start in zip(NEGATIVE_TYPES.values(), curriculum)},
    )
    set_seed(seed + world_size_and_rank()[1])  # from here, a stream of its own on each rank
    return moco


def compile_step(model: nn.Module, mode: str) -> nn.Module:
    """`model` as `accelerator.prepare` made it (DDP's wrapper under several processes), compiled
    for --compile: the forward of the whole step (encoders, shuffle BN, queue, mixing, loss) and its
    backward, with graph breaks where dynamo cannot trace (the mixing's seeded generator). Compiled
    after DDP wraps it, dynamo splits the graph at DDP's gradient buckets, so that their
    all-reduce overlaps the backward. Only the returned wrapper is called: the prepared model,
    which Accelerate saves, keeps the eager state-dict keys (no `_orig_mod.`), so checkpoints and
    the export do not depend on the option. mode: torch.compile's (`--compile_mode`); reduce-overhead
    replays the graphs as CUDA graphs on a GPU, and compiles as the default on the CPU."""
    return torch.compile(model, mode=None if mode == "default" else mode)


def shuffle_bn_warning(moco: MoCo, num_processes: int) -> Optional[str]:
    """The start-up warning of a run without shuffle BN, else None: one process, a model with
    BatchNorm and --bn_splits 1, where the key encoder's BatchNorm normalises the very images the
    query encoder's does. Several processes shuffle the keys across ranks; models without
    BatchNorm have nothing to shuffle."""
    if num_processes > 1 or not moco.shuffle_keys or moco.bn_splits > 1:
        return None
    return ("No shuffle BN (one process, --bn_splits 1): the key encoder's BatchNorm sees the query's batch, a "
            "shortcut that cost MoCo's CIFAR-10 demo about 4% kNN at 800 epochs; --bn_splits 8 shuffles as 8 GPUs do")


def build_optimizer(optimization: OptimizationConfig, module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """--optimizer over `module`'s trainable parameters at lr_base (`resolve_lr`), with weight decay on
    all of them under --decay_all_params."""
    return make_optimizer(module, name=optimization.optimizer, lr=optimization.lr_base,
                          weight_decay=optimization.weight_decay, momentum=optimization.momentum, device=device,
                          decay_all_params=optimization.decay_all_params)


def start_hub_pusher(hub: HubConfig, dir_out: str, accelerator: Accelerator) -> Optional[HubPusher]:
    """The main process's pusher, checked (token, repo id, network) before any compute; a failed
    check stops every rank with the same line."""
    if not hub.push_to_hub:
        return None
    pusher, problem = None, None
    if accelerator.is_main_process:
        pusher = HubPusher(hub.hub_model_id, private=hub.hub_private, strategy=hub.hub_strategy,
                           staging_dir=Path(dir_out) / ".hub-staging")
        try:
            pusher.check()
        except HubError as error:
            problem = str(error)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise HubError(problem)
    return pusher


def publish_encoder(config: TrainConfig, moco: MoCo, results: dict, steps_trained: int) -> Path:
    """Export the query backbone (timm layout) with its model card to dir_out/encoder; the card
    gives the steps trained and which synthetic negatives were used from which step."""
    encoder_dir = export_encoder(moco.encoder_q.backbone, Path(config.run.dir_out) / "encoder",
                                 img_size=config.data.img_size, mean=config.augmentation.mean,
                                 std=config.augmentation.std, crop_pct=config.evaluation.eval_crop_pct)
    results = results | {"steps": steps_trained} | negatives_used(moco, steps_trained)
    curves = copy_curves(config.run.dir_out, encoder_dir)  # the latest dir_out/curves.png, for the card and the Hub
    write_model_card(encoder_dir, config=config.options(), results=results, repo_id=config.hub.hub_model_id,
                     curves=curves)
    return encoder_dir
