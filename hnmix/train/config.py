"""Every training option in one dataclass: default, seed alias, help, parsing and validation.

Sources, later ones winning: the dataclass defaults, a YAML file given with `--config`, then the
command line. The seed implementation's option names and short aliases are kept
(`-km/--k_moco`, ...). Validation raises `ConfigError` with one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from hnmix.backbones import STEMS
from hnmix.data.augmentation import (
    AUGMENTATION_OPTIONS,
    MOCO_V2,
    NUMBER_OPTIONS,
    OPTION_HELP,
    OPTION_METAVAR,
    AugmentationSpec,
    parse_normalize,
    parse_numbers,
)
from hnmix.data.transforms import EVAL_CROP_PCT
from hnmix.errors import ConfigError
from hnmix.evaluate.monitor import KNN_FEATURES
from hnmix.mixing import NEGATIVE_TYPES, NegativeType, validate_mixing_sizes
from hnmix.moco import HEADS

MIXED_PRECISION = ("no", "fp16", "bf16")
AUGMENT_DEVICES = ("cpu", "accelerator")
OPTIMIZERS = ("adamw", "sgd", "lars")
MOMENTUM_SCHEDULES = ("constant", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_START = re.compile(r"(\d+)(ep)?")


def parse_eval_every(value: Any) -> str:
    """`--eval_every` in one spelling, "N" (steps) or "Nep" (epochs), from text or a YAML number
    (the config.yaml of an older run holds an int), so that 1000 and "1000" compare equal."""
    match = _START.fullmatch(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if match:
        return f"{int(match.group(1))}{match.group(2) or ''}"
    raise ConfigError(f"option eval_every must be a number of steps (e.g. 1000; 0: off) or of epochs "
                      f"(e.g. 1ep: after every epoch), got {value!r}")


def option(default: Any, help: str, *, alias: Optional[str] = None, choices: Optional[Sequence[Any]] = None,
           group: str = "training", parse: Optional[Callable[[Any], Any]] = None) -> Any:
    """A TrainConfig field. `parse` reads the option's value from a flag's text or a YAML value
    (e.g. "0.08,1" or [0.08, 1]) into its one spelling, or raises a ConfigError."""
    return field(default=default, metadata={"help": help, "alias": alias, "choices": choices, "group": group,
                                            "parse": parse})


def augmentation_option(name: str) -> Any:
    """The TrainConfig field of the augmentation option `name` (`hnmix.data.augmentation`):
    MOCO_V2's default, its help, its parser for a list of numbers or a normalisation."""
    parse = ((lambda value: parse_numbers(name, value)) if name in NUMBER_OPTIONS
             else parse_normalize if name == "normalize" else None)
    return option(getattr(MOCO_V2, name), OPTION_HELP[name], group="augmentation", parse=parse)


@dataclass
class TrainConfig:
    # DATA
    dir_data: Optional[str] = option(None, "Cache directory of `datasets` (default: the HF cache).", alias="-dd", group="data")
    dir_out: str = option("out", "Directory for checkpoints, metrics.jsonl, config.yaml and encoder/.", alias="-do", group="data")
    overwrite_dir_out: bool = option(False, "Delete a previous run in --dir_out before starting afresh (without it, a fresh run into a run's dir_out is refused).", group="data")
    img_size: int = option(224, "Image size of both views.", alias="-i", group="data")
    dataset: str = option("ilee0022/Caltech-256", "Hub id, local dataset repo, image folder, save_to_disk directory, `synthetic` or `synthetic-hard` (generated).", group="data")
    split: str = option("train", "Split to train on.", group="data")
    image_column: str = option("image", "Column holding the images.", group="data")
    label_column: Optional[str] = option(None, "Column holding class labels (default: `label` if present; `none`: no labels).", group="data")
    synthetic_size: int = option(512, "Number of images of each split of `--dataset synthetic` and `synthetic-hard`.", group="data")
    num_workers: Optional[int] = option(None, "DataLoader worker processes per training process (default: the usable cores of this node, a cgroup's CPU quota included, / the training processes on it, less 1 for the process itself; at least 1).", group="data")
    images_in_memory_gib: float = option(1.0, "Decode the training images once and keep them in memory, shared by the DataLoader workers, when they take at most this many GiB per process and each is under twice img_size on its short side (so that the views are the same as when decoded at every draw). CIFAR-10's 50,000 take 0.14 GiB. 0: decode at every draw.", group="data")
    augment_device: Optional[str] = option(
        None,
        "Where the photometric half of the MoCo v2 augmentation (colour jitter, grayscale, blur) runs: `accelerator` "
        "(batched, after the workers' crops) or `cpu` (per image in the DataLoader workers) (default: accelerator "
        "when it is a GPU, else cpu).",
        choices=AUGMENT_DEVICES, group="data",
    )
    max_bad_fraction: float = option(0.1, "Stop when more than this fraction of the images read could not be (each is replaced and counted).", group="data")
    # AUGMENTATION (hnmix.data.augmentation.AugmentationSpec; the defaults are MoCo v2's)
    crop_scale: tuple[float, ...] = augmentation_option("crop_scale")
    flip_p: float = augmentation_option("flip_p")
    jitter: tuple[float, ...] = augmentation_option("jitter")
    jitter_p: float = augmentation_option("jitter_p")
    grayscale_p: float = augmentation_option("grayscale_p")
    blur_p: float = augmentation_option("blur_p")
    blur_sigma: tuple[float, ...] = augmentation_option("blur_sigma")
    normalize: str = augmentation_option("normalize")
    # TRAINING
    steps: int = option(25000, "Number of optimizer steps.", alias="-s")
    batch_size: int = option(64, "Batch size per process (global batch = batch_size x processes).", alias="-bs")
    stop_at: Optional[int] = option(None, "Stop after this step with a checkpoint (e.g. within a job's time limit); the schedule still spans --steps.", alias=None)
    steps_save: int = option(1000, "Save a checkpoint every this many steps (and at the end).", alias="-ss")
    steps_print: int = option(500, "Log a line and a metrics.jsonl record every this many steps.", alias="-sp")
    seed: int = option(69420, "Seed for reproducibility.", alias="-se")
    device: Optional[str] = option(
        None,
        "Seed option, kept where it still means something: `cpu` forces the CPU; a GPU index selects that GPU "
        "for a single-process run. Under `accelerate launch` use its --gpu_ids instead.",
        alias="-d",
    )
    optimizer: str = option("adamw", "adamw (the seed's), sgd (momentum, no Nesterov: MoCo's) or lars; biases and norm layers get no weight decay (and no LARS adaptation) unless --decay_all_params.", choices=OPTIMIZERS)
    weight_decay: float = option(0.01, "Weight decay (the seed's 0.01; MoCo v2 uses 1e-4 with sgd).")
    decay_all_params: bool = option(False, "Weight decay on every parameter, biases and norm layers too (MoCo's own code and its CIFAR-10 demo); under lars they are then LARS-adapted too. Off: timm's groups, which exclude them.")
    momentum: float = option(0.9, "Momentum of sgd and lars.")
    lr_base: float = option(2e-4, "Peak learning rate (the seed's, for AdamW); see --lr_per_256.", alias="-lrb")
    lr_per_256: Optional[float] = option(None, "MoCo's convention: the peak learning rate is this value x global batch / 256 (e.g. 0.03 with sgd); replaces --lr_base, and the log names the value.")
    lr_warmup: float = option(2.5e-7, "Learning rate at step 0, rising linearly over the warmup (--warmup_fraction).", alias="-lrw")
    warmup_fraction: float = option(0.1, "Fraction of the steps spent in the linear warmup (the seed's 0.1; 0: none, as MoCo v2).")
    lr_min: float = option(2.5e-6, "Final learning rate of the cosine schedule.", alias="-lrm")
    clip_grad: float = option(5.0, "Clip the gradient norm to this value (0: no clipping).", alias="-cg")
    max_nonfinite_steps: int = option(10, "Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped; fp16 uses loss scaling instead).")
    mixed_precision: Optional[str] = option(None, "no|fp16|bf16 (default: the accelerate config).", choices=MIXED_PRECISION)
    compile: bool = option(False, "torch.compile the training step (forward and backward of the encoders, queue, mixing and loss), after Accelerate prepares the model: DDP's all-reduce overlaps the backward; checkpoints stay those of the eager model.")
    compile_mode: str = option("default", "torch.compile's mode under --compile: default, reduce-overhead (CUDA graphs on a GPU: fewer kernel launches from the host) or max-autotune.", choices=COMPILE_MODES)
    deterministic: bool = option(False, "torch's deterministic algorithms (cuDNN and cuBLAS included, CUBLAS_WORKSPACE_CONFIG set): a run and its resume repeat their losses exactly on CUDA too, somewhat slower.")
    keep_checkpoints: int = option(3, "Keep the newest N checkpoints (0: keep all).")
    report_to: str = option("none", "Trackers for Accelerate: none, all, tensorboard, wandb, ... (comma separated).")
    config: Optional[str] = option(None, "YAML file of options (long names as keys); flags override it.")
    # MODEL
    arch: str = option("efficientnet_b2", "Any timm model name.", alias="-a", group="model")
    stem: str = option("default", "default: the arch's own stem; cifar: conv1 3x3 stride 1 and no max-pool, for small images such as CIFAR's 32x32 (MoCo's CIFAR-10 demo); only timm ResNets with a single-convolution stem (resnet18, resnet50, ...). Exports load with hnmix.load_encoder.", choices=STEMS, group="model")
    head: str = option("mlp", "Projection head: mlp (MoCo v2: Linear, ReLU, Linear) or linear (MoCo v1, the CIFAR-10 demo: one Linear to dim_moco).", choices=HEADS, group="model")
    resnet_init: str = option("timm", "timm: each residual block's last BatchNorm starts at 0 (timm's zero_init_last); torchvision: at 1, as torchvision's ResNets, MoCo's own code and its CIFAR-10 demo start. Only for timm ResNets.", choices=("timm", "torchvision"), group="model")
    resume: Optional[str] = option(None, "Checkpoint directory to resume from; `latest`: the newest in dir_out; `auto`: latest if any, else start fresh.", alias="-r", group="model")
    dim_moco: int = option(128, "Output dimension of the projection head.", alias="-dm", group="model")
    k_moco: int = option(2**13, "Queue size K; a multiple of the global batch.", alias="-km", group="model")
    m_moco: float = option(0.999, "Momentum of the key encoder's moving average.", alias="-mm", group="model")
    momentum_schedule: str = option("constant", "constant: m_moco throughout; cosine: from m_moco at the first step to 1 at the last (BYOL, MoCo v3).", choices=MOMENTUM_SCHEDULES, group="model")
    symmetric: bool = option(False, "Each view is also a query against the other's key (MoCo v3, solo-learn's MoCo v2+); the loss is the mean of both directions, the queue gets each image's key once; twice the encoder work.", group="model")
    t_moco: float = option(0.07, "Softmax temperature.", alias="-tm", group="model")
    n_hard: int = option(32, "Mix from each query's n_hard hardest queue negatives.", alias="-nh", group="model")
    s1_hard: int = option(16, "Type-1 synthetic negatives per query (two hard negatives mixed).", alias="-s1h", group="model")
    s2_hard: int = option(16, "Type-2 synthetic negatives per query (query mixed with a hard negative).", alias="-s2h", group="model")
    start1_hard: str = option("5000", "First step with type 1: a step (0: from the first step) or epochs, e.g. 10ep; it must come before the end of the run.", alias="-st1h", group="model")
    start2_hard: str = option("10000", "First step with type 2: a step (0: from the first step) or epochs, e.g. 10ep; it must come before the end of the run.", alias="-st2h", group="model")
    bn_splits: int = option(1, "Split BatchNorm into this many groups on one process (simulates shuffle BN across GPUs).", group="model")
    # EVALUATION
    eval_every: str = option("1000", "kNN monitor every this many steps, or epochs as Nep (1ep: at the last step of every epoch), and at the end (0: off).", group="evaluation", parse=parse_eval_every)
    knn_split: Optional[str] = option(None, "Split the kNN monitor classifies, with the whole --split as its bank, e.g. test as MoCo's CIFAR-10 demo (default: the validation split, else a stratified held-out part of --split, left out of the bank).", group="evaluation")
    knn_features: str = option("backbone", "What the kNN monitor compares: backbone (the pooled features before the head) or projection (the query encoder's L2-normalised head output, dim_moco wide, as MoCo's CIFAR-10 demo).", choices=KNN_FEATURES, group="evaluation")
    eval_at_start: bool = option(False, "A kNN record at step 0, before the first step: the untrained network measured as the trained one will be.", group="evaluation")
    eval_crop_pct: float = option(EVAL_CROP_PCT, "Centre crop of the kNN monitor's images, a fraction of the resized short side: resize to img_size / eval_crop_pct, crop img_size (0.875: ImageNet's 256 then 224; 1: no crop, images of img_size pass unchanged, as MoCo's CIFAR-10 demo).", group="evaluation")
    eval_split_size: float = option(0.1, "Held-out fraction (< 1) or count when the dataset has no validation split.", group="evaluation")
    eval_max_samples: int = option(10000, "At most this many samples of each evaluation split (0: all).", group="evaluation")
    knn_k: int = option(200, "Neighbours of the weighted kNN monitor.", group="evaluation")
    knn_temperature: float = option(0.1, "Temperature of the weighted kNN monitor.", group="evaluation")
    # HUB
    push_to_hub: bool = option(False, "Push the encoder and a model card to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`).", group="hub")
    hub_model_id: Optional[str] = option(None, "Repository to push to, user/name.", group="hub")
    hub_private: bool = option(False, "Create the repository private.", group="hub")
    hub_strategy: str = option("end", "end: push at the end; every_save: at every checkpoint; checkpoint: also the training state under last-checkpoint/.", choices=("end", "every_save", "checkpoint"), group="hub")

    def __post_init__(self) -> None:
        for f in fields(self):  # a list of numbers read from YAML: the tuple a flag gives
            if isinstance(getattr(self, f.name), list) and _field_type(f) is tuple:
                setattr(self, f.name, tuple(getattr(self, f.name)))
        if isinstance(self.eval_every, int) and not isinstance(self.eval_every, bool):
            self.eval_every = str(self.eval_every)  # steps, as older hnmix spelt them

    def to_dict(self) -> dict[str, Any]:
        """The options by name; lists of numbers as lists (as YAML writes and reads them back)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @property
    def augmentation(self) -> AugmentationSpec:
        """The augmentation options as the data layer takes them."""
        return AugmentationSpec(**{name: getattr(self, name) for name in AUGMENTATION_OPTIONS})


# Options that may change when a run is resumed; everything else must match the checkpoint.
RESUMABLE_CHANGES = ("overwrite_dir_out", "steps", "stop_at", "steps_print", "steps_save", "keep_checkpoints", "num_workers", "resume", "config",
                     "report_to", "dir_data", "dir_out", "device", "eval_every", "eval_max_samples",
                     "push_to_hub", "hub_model_id", "hub_private", "hub_strategy", "max_bad_fraction",
                     "max_nonfinite_steps", "augment_device", "images_in_memory_gib", "compile", "compile_mode", "deterministic", "eval_at_start")


def _field_type(f: dataclasses.Field) -> type:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind.startswith("tuple"):
        return tuple
    for name, python_type in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if re.search(rf"\b{name}\b", kind):
            return python_type
    raise TypeError(f"unsupported option type {kind}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.train",
        description="Train an image encoder with MoCo and hard negative mixing (MoCHi). "
        "Run it as `accelerate launch -m hnmix.train ...` for several GPUs or nodes. The defaults are the "
        "original implementation's (the seed's); the papers' recipes are YAML files in configs/ for --config.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"].upper()))
        names = [meta["alias"], f"--{f.name}"] if meta["alias"] else [f"--{f.name}"]
        default = ",".join(f"{v:g}" for v in f.default) if isinstance(f.default, tuple) else f.default
        text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {default})"
        kind = {"action": "store_true"} if _field_type(f) is bool else {"type": _field_type(f), "choices": meta["choices"]}
        if meta["parse"]:  # text, read by `_coerce` as a YAML value is: one way for both, one-line errors
            kind = {"type": str, "metavar": OPTION_METAVAR.get(f.name)}
        group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kind)
    return parser


# The options read from text or YAML by a parser of their own (`option(parse=...)`).
_PARSED = {f.name for f in fields(TrainConfig) if f.metadata["parse"]}


def _coerce(name: str, value: Any) -> Any:
    f = {f.name: f for f in fields(TrainConfig)}[name]
    if value is None:
        if "Optional" in str(f.type):
            return None
        raise ConfigError(f"option {name} must not be empty")
    if f.metadata["parse"]:
        return f.metadata["parse"](value)
    expected = _field_type(f)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ConfigError(f"option {name} must be {expected.__name__}, got {value!r}")
    return value


def load_yaml_options(path: str) -> dict[str, Any]:
    """Options from a YAML mapping with long option names as keys."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}; see --help for the names")
    options = {name: _coerce(name, value) for name, value in data.items()}
    choices = {f.name: f.metadata["choices"] for f in fields(TrainConfig)}
    for name, value in options.items():
        if choices[name] and value is not None and value not in choices[name]:
            raise ConfigError(f"option {name} must be one of {', '.join(choices[name])}, got {value!r}")
    return options


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults, then `--config FILE`, then flags. Exits via argparse for malformed flags."""
    flags = {name: _coerce(name, value) if name in _PARSED else value
             for name, value in vars(build_parser().parse_args(argv)).items()}
    from_file = load_yaml_options(flags["config"]) if flags.get("config") else {}
    config = TrainConfig(**(from_file | flags))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks that need no model, data or processes; one ConfigError line each."""
    if config.compile_mode != "default" and not config.compile:
        raise ConfigError(f"option compile_mode={config.compile_mode} needs --compile; add it, or leave --compile_mode out")
    positive = ("img_size", "steps", "batch_size", "steps_save", "steps_print", "dim_moco", "k_moco", "synthetic_size",
                "max_nonfinite_steps")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"option {name} must be >= 1, got {getattr(config, name)}")
    non_negative = ("num_workers", "keep_checkpoints", "weight_decay", "momentum", "images_in_memory_gib")
    for name in non_negative:
        if getattr(config, name) is not None and getattr(config, name) < 0:  # num_workers None: auto
            raise ConfigError(f"option {name} must be >= 0, got {getattr(config, name)}")
    if config.bn_splits < 1 or config.batch_size % config.bn_splits:
        raise ConfigError(f"option bn_splits must be >= 1 and divide batch_size {config.batch_size}, got {config.bn_splits}")
    if not 0 <= config.m_moco <= 1:
        raise ConfigError(f"option m_moco must be in [0, 1], got {config.m_moco}")
    if not config.t_moco > 0:
        raise ConfigError(f"option t_moco must be > 0, got {config.t_moco}")
    try:
        validate_mixing_sizes(queue_size=config.k_moco, queue_name="k_moco", temperature=config.t_moco,
                              n_hard=config.n_hard, **negative_counts(config))
    except ValueError as error:
        raise ConfigError(f"option {error}") from None
    for name in ("lr_base", "lr_warmup", "lr_min", "clip_grad"):
        if getattr(config, name) < 0:
            raise ConfigError(f"option {name} must be >= 0, got {getattr(config, name)}")
    if config.lr_per_256 is not None and not config.lr_per_256 > 0:
        raise ConfigError(f"option lr_per_256 must be > 0, got {config.lr_per_256}")
    if not 0 <= config.warmup_fraction < 1:
        raise ConfigError(f"option warmup_fraction must be in [0, 1), got {config.warmup_fraction}")
    if not config.momentum < 1:
        raise ConfigError(f"option momentum must be < 1, got {config.momentum}")
    for kind in NEGATIVE_TYPES.values():
        if not _START.fullmatch(_start_text(config, kind)):
            raise ConfigError(f"option {kind.start_option} must be a step (e.g. 5000) or a number of epochs (e.g. "
                              f"10ep), got {_start_text(config, kind)!r}")
    if config.resume is None:  # a resumed run may have changed --steps: judged once the checkpoint is known
        for kind, step in zip(NEGATIVE_TYPES.values(), curriculum_steps(config, steps_per_epoch=None)):
            problem = curriculum_problem(config, kind, step)
            if problem:
                raise ConfigError(problem)
    parse_eval_every(config.eval_every)
    for name in ("eval_max_samples", "knn_k"):
        if getattr(config, name) < 0:
            raise ConfigError(f"option {name} must be >= 0, got {getattr(config, name)}")
    if config.knn_split is not None and config.knn_split == config.split:
        raise ConfigError(f"option knn_split: {config.knn_split} is the split trained on, the kNN bank, where every "
                          "query would find itself; choose another split (e.g. test), or leave it out to hold out a "
                          "part of it")
    if not 0 < config.eval_crop_pct <= 1:
        raise ConfigError(f"option eval_crop_pct must be in (0, 1] (1: no crop), got {config.eval_crop_pct}")
    if not config.eval_split_size > 0 or (config.eval_split_size >= 1 and not config.eval_split_size.is_integer()):
        raise ConfigError(f"option eval_split_size must be a fraction in (0, 1) or a whole count, got {config.eval_split_size}")
    if not 0 <= config.max_bad_fraction <= 1:
        raise ConfigError(f"option max_bad_fraction must be in [0, 1], got {config.max_bad_fraction}")
    if not config.knn_temperature > 0:
        raise ConfigError(f"option knn_temperature must be > 0, got {config.knn_temperature}")
    if config.push_to_hub and not config.hub_model_id:
        raise ConfigError("option push_to_hub needs --hub_model_id user/name")
    if config.stop_at is not None and not 1 <= config.stop_at <= config.steps:
        raise ConfigError(f"option stop_at must be in [1, steps={config.steps}], got {config.stop_at}")
    if config.device is not None and config.device != "cpu" and not config.device.isdigit():
        raise ConfigError(f"option device must be `cpu` or a GPU index, got {config.device!r}")
    config.augmentation.check()


def start_step(text: str, steps_per_epoch: Optional[int]) -> Optional[int]:
    """`--start1_hard`/`--start2_hard` as a step: `N` is step N, `Nep` is N x steps_per_epoch
    (None when steps_per_epoch is not known yet)."""
    value, epochs = _START.fullmatch(text).groups()
    if not epochs:
        return int(value)
    return None if steps_per_epoch is None else int(value) * steps_per_epoch


def eval_every_steps(config: TrainConfig, *, steps_per_epoch: Optional[int]) -> Optional[int]:
    """`--eval_every` as a number of steps: N, or N x steps_per_epoch for Nep (None while
    steps_per_epoch is not known); 0: the kNN monitor is off."""
    return start_step(config.eval_every, steps_per_epoch)


def knn_monitor_on(config: TrainConfig) -> bool:
    """Whether `--eval_every` asks for the kNN monitor (anything but 0 steps or 0 epochs)."""
    return bool(eval_every_steps(config, steps_per_epoch=1))


def negative_counts(config: TrainConfig) -> dict[str, int]:
    """Each registered negative type's count per query by its option (s1_hard, s2_hard, ...); 0 for
    a type the config has no option for."""
    return {t.count_option: getattr(config, t.count_option, 0) for t in NEGATIVE_TYPES.values()}


def _start_text(config: TrainConfig, kind: NegativeType) -> str:
    return getattr(config, kind.start_option, "0")


def curriculum_steps(config: TrainConfig, *, steps_per_epoch: Optional[int]) -> tuple[Optional[int], ...]:
    """The first step of each negative type in the registry's order ((type 1, type 2) for MoCHi),
    None where an epoch count awaits steps_per_epoch."""
    return tuple(start_step(_start_text(config, t), steps_per_epoch) for t in NEGATIVE_TYPES.values())


def curriculum_problem(config: TrainConfig, kind: NegativeType, step: Optional[int]) -> Optional[str]:
    """The line refusing a negative type that is asked for (count > 0) but would start at or after
    the last step, so that the run would silently train without it; else None."""
    if step is None or not negative_counts(config)[kind.count_option] or step < config.steps:
        return None
    given = _start_text(config, kind)
    shown = given if given.isdigit() else f"{given} = step {step}"
    return (f"option {kind.start_option}={shown} is at or past the end of the run (--steps {config.steps}): "
            f"{kind.label} negatives would never be used; start it earlier (a step below {config.steps}, "
            f"or epochs such as 10ep), or pass --{kind.count_option} 0 to train without them")


def check_queue_fits_global_batch(config: TrainConfig, num_processes: int) -> None:
    global_batch = config.batch_size * num_processes
    if config.k_moco % global_batch:
        suggestion = max(1, config.k_moco // global_batch) * global_batch
        raise ConfigError(
            f"option k_moco={config.k_moco} must be a multiple of the global batch {global_batch} "
            f"(batch_size {config.batch_size} x {num_processes} processes); try --k_moco {suggestion}"
        )


CONFIG_FILE = "config.yaml"


# Options that say how one invocation starts, not what the run is: left out of the saved
# config.yaml, so that `--config DIR_OUT/config.yaml --dir_out NEW` starts the same run afresh.
INVOCATION_ONLY = ("resume", "overwrite_dir_out", "config")


def run_options(config: TrainConfig) -> dict[str, Any]:
    """The options that describe the run: all but INVOCATION_ONLY."""
    return {name: value for name, value in config.to_dict().items() if name not in INVOCATION_ONLY}


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved configuration of the run (`run_options`), loadable again with `--config`."""
    return yaml.safe_dump(run_options(config), sort_keys=False, default_flow_style=None)  # [0.2, 1.0] on one line


def config_differences(saved: dict[str, Any], current: TrainConfig, *, resumable: bool = False) -> list[str]:
    """`name: saved -> current` for every option of the run (`run_options`; a checkpoint of an
    older hnmix may still hold the others) that differs and may not change on resume (or, with
    resumable=True, that differs and may). An option the saved config lacks (it is newer than
    the checkpoint) counts as its default, which is what the saved run did."""
    now, defaults = run_options(current), TrainConfig().to_dict()
    saved = {name: saved.get(name, defaults[name]) for name in now}
    return [f"{name}: {saved[name]!r} -> {now[name]!r}" for name in now
            if (name in RESUMABLE_CHANGES) == resumable and _spelt_alike(name, saved[name]) != _spelt_alike(name, now[name])]


def _spelt_alike(name: str, value: Any) -> Any:
    """`value` of option `name` in the one spelling of its parser (`option(parse=...)`), when it
    has one and the value parses: an older config.yaml's eval_every 1000 equals "1000"."""
    parse = {f.name: f for f in fields(TrainConfig)}[name].metadata["parse"]
    if parse is None or value is None:
        return value
    try:
        return parse(value)
    except ConfigError:
        return value
