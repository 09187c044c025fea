"""Every training option, in groups (data, augmentation, model, method, optimization, evaluation,
hub, run): default, seed alias, help, parsing and validation.

Sources, later ones winning: the dataclass defaults, a YAML file given with `--config` (grouped,
as config.yaml is written, or flat, as older runs wrote it), then the command line. Options keep
flat names on the command line (`--k_moco`, the seed's `-km`) and in `TrainConfig.from_options`;
each belongs to one group (`config.method.k_moco`). Validation raises `ConfigError` with one line
naming the option.
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
from hnmix.run_config import OPTION_GROUPS, flat_options

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
           parse: Optional[Callable[[Any], Any]] = None) -> Any:
    """A TrainConfig field. `parse` reads the option's value from a flag's text or a YAML value
    (e.g. "0.08,1" or [0.08, 1]) into its one spelling, or raises a ConfigError."""
    return field(default=default, metadata={"help": help, "alias": alias, "choices": choices, "parse": parse})


def _augmentation_metadata(name: str) -> dict[str, Any]:
    """The option metadata of augmentation option `name` (an `AugmentationSpec` field, the
    augmentation group as the data layer takes it): its help and its parser."""
    parse = ((lambda value: parse_numbers(name, value)) if name in NUMBER_OPTIONS
             else parse_normalize if name == "normalize" else None)
    return {"help": OPTION_HELP[name], "alias": None, "choices": None, "parse": parse}


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how the DataLoader reads them."""

    dataset: str = option("ilee0022/Caltech-256", "Hub id, local dataset repo, image folder, save_to_disk directory, `synthetic` or `synthetic-hard` (generated).")
    split: str = option("train", "Split to train on.")
    image_column: str = option("image", "Column holding the images.")
    label_column: Optional[str] = option(None, "Column holding class labels (default: `label` if present; `none`: no labels).")
    dir_data: Optional[str] = option(None, "Cache directory of `datasets` (default: the HF cache).", alias="-dd")
    synthetic_size: int = option(512, "Number of images of each split of `--dataset synthetic` and `synthetic-hard`.")
    img_size: int = option(224, "Image size of both views.", alias="-i")
    num_workers: Optional[int] = option(None, "DataLoader worker processes per training process (default: the usable cores of this node, a cgroup's CPU quota included, / the training processes on it, less 1 for the process itself; at least 1).")
    images_in_memory_gib: float = option(1.0, "Decode the training images once and keep them in memory, shared by the DataLoader workers, when they take at most this many GiB per process and each is under twice img_size on its short side (so that the views are the same as when decoded at every draw). CIFAR-10's 50,000 take 0.14 GiB. 0: decode at every draw.")
    augment_device: Optional[str] = option(
        None,
        "Where the photometric half of the MoCo v2 augmentation (colour jitter, grayscale, blur) runs: `accelerator` "
        "(batched, after the workers' crops) or `cpu` (per image in the DataLoader workers) (default: accelerator "
        "when it is a GPU, else cpu).",
        choices=AUGMENT_DEVICES,
    )
    max_bad_fraction: float = option(0.1, "Stop when more than this fraction of the images read could not be (each is replaced and counted).")


@dataclass(frozen=True)
class ModelConfig:
    """The encoder: timm backbone, stem, initialisation and projection head."""

    arch: str = option("efficientnet_b2", "Any timm model name.", alias="-a")
    stem: str = option("default", "default: the arch's own stem; cifar: conv1 3x3 stride 1 and no max-pool, for small images such as CIFAR's 32x32 (MoCo's CIFAR-10 demo); only timm ResNets with a single-convolution stem (resnet18, resnet50, ...). Exports load with hnmix.load_encoder.", choices=STEMS)
    head: str = option("mlp", "Projection head: mlp (MoCo v2: Linear, ReLU, Linear) or linear (MoCo v1, the CIFAR-10 demo: one Linear to dim_moco).", choices=HEADS)
    resnet_init: str = option("timm", "timm: each residual block's last BatchNorm starts at 0 (timm's zero_init_last); torchvision: at 1, as torchvision's ResNets, MoCo's own code and its CIFAR-10 demo start. Only for timm ResNets.", choices=("timm", "torchvision"))
    dim_moco: int = option(128, "Output dimension of the projection head.", alias="-dm")


@dataclass(frozen=True)
class MoCoConfig:
    """MoCo's options (queue, momentum, temperature, shuffle BN) and the hard negatives mixed from."""

    k_moco: int = option(2**13, "Queue size K; a multiple of the global batch.", alias="-km")
    m_moco: float = option(0.999, "Momentum of the key encoder's moving average.", alias="-mm")
    momentum_schedule: str = option("constant", "constant: m_moco throughout; cosine: from m_moco at the first step to 1 at the last (BYOL, MoCo v3).", choices=MOMENTUM_SCHEDULES)
    t_moco: float = option(0.07, "Softmax temperature.", alias="-tm")
    symmetric: bool = option(False, "Each view is also a query against the other's key (MoCo v3, solo-learn's MoCo v2+); the loss is the mean of both directions, the queue gets each image's key once; twice the encoder work.")
    bn_splits: int = option(1, "Split BatchNorm into this many groups on one process (simulates shuffle BN across GPUs).")
    n_hard: int = option(32, "Mix from each query's n_hard hardest queue negatives.", alias="-nh")


# The seed's defaults and short aliases of MoCHi's two types' options: (count, start, count alias,
# start alias). A type registered without an entry gets its two options with count 0 (off), start 0.
SEED_TYPE_OPTIONS = {"type1": (16, "5000", "-s1h", "-st1h"), "type2": (16, "10000", "-s2h", "-st2h")}


def negative_type_options(kind: NegativeType) -> list[tuple[str, type, Any]]:
    """The count and start options of a registered negative type, as dataclass fields."""
    count, start, count_alias, start_alias = SEED_TYPE_OPTIONS.get(kind.name, (0, "0", None, None))
    return [
        (kind.count_option, int, option(count, f"{kind.label.capitalize()} synthetic negatives per query "
                                               f"({kind.about}).", alias=count_alias)),
        (kind.start_option, str, option(start, f"First step with {kind.label} negatives: a step (0: from the first "
                                               "step) or epochs, e.g. 10ep; it must come before the end of the run.",
                                        alias=start_alias)),
    ]


# The method group: MoCo's options, then a count and a start option for each registered type.
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig", [spec for kind in NEGATIVE_TYPES.values() for spec in negative_type_options(kind)],
    bases=(MoCoConfig,), frozen=True)
MethodConfig.__module__ = __name__  # where pickle finds it


@dataclass(frozen=True)
class OptimizationConfig:
    """Steps, batch, optimizer, learning-rate schedule and the step's guards."""

    steps: int = option(25000, "Number of optimizer steps.", alias="-s")
    batch_size: int = option(64, "Batch size per process (global batch = batch_size x processes).", alias="-bs")
    optimizer: str = option("adamw", "adamw (the seed's), sgd (momentum, no Nesterov: MoCo's) or lars; biases and norm layers get no weight decay (and no LARS adaptation) unless --decay_all_params.", choices=OPTIMIZERS)
    lr_base: float = option(2e-4, "Peak learning rate (the seed's, for AdamW); see --lr_per_256.", alias="-lrb")
    lr_per_256: Optional[float] = option(None, "MoCo's convention: the peak learning rate is this value x global batch / 256 (e.g. 0.03 with sgd); replaces --lr_base, and the log names the value.")
    lr_warmup: float = option(2.5e-7, "Learning rate at step 0, rising linearly over the warmup (--warmup_fraction).", alias="-lrw")
    warmup_fraction: float = option(0.1, "Fraction of the steps spent in the linear warmup (the seed's 0.1; 0: none, as MoCo v2).")
    lr_min: float = option(2.5e-6, "Final learning rate of the cosine schedule.", alias="-lrm")
    momentum: float = option(0.9, "Momentum of sgd and lars.")
    weight_decay: float = option(0.01, "Weight decay (the seed's 0.01; MoCo v2 uses 1e-4 with sgd).")
    decay_all_params: bool = option(False, "Weight decay on every parameter, biases and norm layers too (MoCo's own code and its CIFAR-10 demo); under lars they are then LARS-adapted too. Off: timm's groups, which exclude them.")
    clip_grad: float = option(5.0, "Clip the gradient norm to this value (0: no clipping).", alias="-cg")
    max_nonfinite_steps: int = option(10, "Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped; fp16 uses loss scaling instead).")


@dataclass(frozen=True)
class EvaluationConfig:
    """The kNN monitor during training."""

    eval_every: str = option("1000", "kNN monitor every this many steps, or epochs as Nep (1ep: at the last step of every epoch), and at the end (0: off).", parse=parse_eval_every)
    knn_split: Optional[str] = option(None, "Split the kNN monitor classifies, with the whole --split as its bank, e.g. test as MoCo's CIFAR-10 demo (default: the validation split, else a stratified held-out part of --split, left out of the bank).")
    knn_features: str = option("backbone", "What the kNN monitor compares: backbone (the pooled features before the head) or projection (the query encoder's L2-normalised head output, dim_moco wide, as MoCo's CIFAR-10 demo).", choices=KNN_FEATURES)
    eval_at_start: bool = option(False, "A kNN record at step 0, before the first step: the untrained network measured as the trained one will be.")
    eval_crop_pct: float = option(EVAL_CROP_PCT, "Centre crop of the kNN monitor's images, a fraction of the resized short side: resize to img_size / eval_crop_pct, crop img_size (0.875: ImageNet's 256 then 224; 1: no crop, images of img_size pass unchanged, as MoCo's CIFAR-10 demo).")
    eval_split_size: float = option(0.1, "Held-out fraction (< 1) or count when the dataset has no validation split.")
    eval_max_samples: int = option(10000, "At most this many samples of each evaluation split (0: all).")
    knn_k: int = option(200, "Neighbours of the weighted kNN monitor.")
    knn_temperature: float = option(0.1, "Temperature of the weighted kNN monitor.")


@dataclass(frozen=True)
class HubConfig:
    """Pushing the encoder to the Hugging Face Hub."""

    push_to_hub: bool = option(False, "Push the encoder and a model card to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`).")
    hub_model_id: Optional[str] = option(None, "Repository to push to, user/name.")
    hub_private: bool = option(False, "Create the repository private.")
    hub_strategy: str = option("end", "end: push at the end; every_save: at every checkpoint; checkpoint: also the training state under last-checkpoint/.", choices=("end", "every_save", "checkpoint"))


@dataclass(frozen=True)
class RunConfig:
    """How this invocation runs: output directory, resume, cadences, seed, devices and precision."""

    dir_out: str = option("out", "Directory for checkpoints, metrics.jsonl, config.yaml and encoder/.", alias="-do")
    overwrite_dir_out: bool = option(False, "Delete a previous run in --dir_out before starting afresh (without it, a fresh run into a run's dir_out is refused).")
    resume: Optional[str] = option(None, "Checkpoint directory to resume from; `latest`: the newest in dir_out; `auto`: latest if any, else start fresh.", alias="-r")
    config: Optional[str] = option(None, "YAML file of options (long names as keys); flags override it.")
    stop_at: Optional[int] = option(None, "Stop after this step with a checkpoint (e.g. within a job's time limit); the schedule still spans --steps.")
    steps_save: int = option(1000, "Save a checkpoint every this many steps (and at the end).", alias="-ss")
    steps_print: int = option(500, "Log a line and a metrics.jsonl record every this many steps.", alias="-sp")
    keep_checkpoints: int = option(3, "Keep the newest N checkpoints (0: keep all).")
    seed: int = option(69420, "Seed for reproducibility.", alias="-se")
    device: Optional[str] = option(
        None,
        "Seed option, kept where it still means something: `cpu` forces the CPU; a GPU index selects that GPU "
        "for a single-process run. Under `accelerate launch` use its --gpu_ids instead.",
        alias="-d",
    )
    mixed_precision: Optional[str] = option(None, "no|fp16|bf16 (default: the accelerate config).", choices=MIXED_PRECISION)
    compile: bool = option(False, "torch.compile the training step (forward and backward of the encoders, queue, mixing and loss), after Accelerate prepares the model: DDP's all-reduce overlaps the backward; checkpoints stay those of the eager model.")
    compile_mode: str = option("default", "torch.compile's mode under --compile: default, reduce-overhead (CUDA graphs on a GPU: fewer kernel launches from the host) or max-autotune.", choices=COMPILE_MODES)
    deterministic: bool = option(False, "torch's deterministic algorithms (cuDNN and cuBLAS included, CUBLAS_WORKSPACE_CONFIG set): a run and its resume repeat their losses exactly on CUDA too, somewhat slower.")
    report_to: str = option("none", "Trackers for Accelerate: none, all, tensorboard, wandb, ... (comma separated).")


@dataclass(frozen=True)
class TrainConfig:
    """Every training option, in groups: `config.data.img_size`, `config.method.k_moco`, ...
    The augmentation group is the data layer's `AugmentationSpec` (defaults: MoCo v2's)."""

    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationSpec = field(default_factory=AugmentationSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_options(cls, options: Optional[dict[str, Any]] = None, /, **more: Any) -> "TrainConfig":
        """The config of options by their flat names (flags, an older flat config.yaml), each
        read by `_coerce`; the others keep their defaults."""
        options = {**(options or {}), **more}
        groups = {group: {name: _coerce(name, options[name]) for name in _GROUP_OPTIONS[group] if name in options}
                  for group in OPTION_GROUPS}
        unknown = sorted(set(options) - set(_OPTION_GROUP))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see --help for the names")
        return cls(**{group: _GROUP_TYPES[group](**values) for group, values in groups.items()})

    def with_options(self, **changes: Any) -> "TrainConfig":
        """This config with the options named flat (`s1_hard=0`) changed."""
        return TrainConfig.from_options(self.options() | changes)

    def options(self) -> dict[str, Any]:
        """{option: value} by flat name, in group order; lists of numbers as lists (as YAML
        writes and reads them back)."""
        return {name: value for group in self.to_dict().values() for name, value in group.items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{group: {option: value}}, the nested YAML of config.yaml and the recipes."""
        return {group: {name: list(value) if isinstance(value, tuple) else value
                        for name, value in dataclasses.asdict(getattr(self, group)).items()}
                for group in OPTION_GROUPS}


_GROUP_TYPES: dict[str, type] = {f.name: f.default_factory for f in fields(TrainConfig)}
_GROUP_OPTIONS: dict[str, tuple[str, ...]] = {group: tuple(f.name for f in fields(kind))
                                              for group, kind in _GROUP_TYPES.items()}
_OPTION_GROUP: dict[str, str] = {name: group for group, names in _GROUP_OPTIONS.items() for name in names}
_FIELDS: dict[str, dataclasses.Field] = {f.name: f for kind in _GROUP_TYPES.values() for f in fields(kind)}


def _metadata(name: str) -> dict[str, Any]:
    return _FIELDS[name].metadata or _augmentation_metadata(name)


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
    for group, names in _GROUP_OPTIONS.items():
        arguments = parser.add_argument_group(group.upper())
        for name in names:
            f, meta = _FIELDS[name], _metadata(name)
            default = ",".join(f"{v:g}" for v in f.default) if isinstance(f.default, tuple) else f.default
            text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {default})"
            kind = {"action": "store_true"} if _field_type(f) is bool else {"type": _field_type(f), "choices": meta["choices"]}
            if meta["parse"]:  # text, read by `_coerce` as a YAML value is: one way for both, one-line errors
                kind = {"type": str, "metavar": OPTION_METAVAR.get(name)}
            flags = [meta["alias"], f"--{name}"] if meta["alias"] else [f"--{name}"]
            arguments.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kind)
    return parser


def _coerce(name: str, value: Any) -> Any:
    """The value of option `name` from a flag or YAML, in its one spelling; else a ConfigError."""
    f, meta = _FIELDS[name], _metadata(name)
    if value is None:
        if "Optional" in str(f.type):
            return None
        raise ConfigError(f"option {name} must not be empty")
    if meta["parse"]:
        return meta["parse"](value)
    expected = _field_type(f)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ConfigError(f"option {name} must be {expected.__name__}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"option {name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    return value


def load_yaml_options(path: str) -> dict[str, Any]:
    """The options of a YAML file by flat name: in groups (`method: {k_moco: 4096}`) or flat
    (`k_moco: 4096`, recipes and config.yaml files of older hnmix)."""
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
    for group, options in data.items():
        for name in options if group in OPTION_GROUPS and isinstance(options, dict) else ():
            if _OPTION_GROUP.get(name, group) != group:
                raise ConfigError(f"config file {path}: option {name} belongs to group {_OPTION_GROUP[name]}, "
                                  f"not {group}; move it there")
    options = flat_options(data)
    unknown = sorted(set(map(str, options)) - set(_OPTION_GROUP))
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}; see --help for the names")
    return {name: _coerce(name, value) for name, value in options.items()}


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults, then `--config FILE`, then flags. Exits via argparse for malformed flags."""
    flags = vars(build_parser().parse_args(argv))
    from_file = load_yaml_options(flags["config"]) if flags.get("config") else {}
    config = TrainConfig.from_options(from_file | flags)
    validate(config)
    return config


# (options, test, what it asks): each value must pass its test, else "option X must be WHAT, got V".
_RANGES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("img_size", "steps", "batch_size", "steps_save", "steps_print", "dim_moco", "k_moco", "synthetic_size",
      "max_nonfinite_steps"), lambda v: v >= 1, ">= 1"),
    (("num_workers", "keep_checkpoints", "weight_decay", "momentum", "images_in_memory_gib", "lr_base", "lr_warmup",
      "lr_min", "clip_grad", "eval_max_samples", "knn_k"), lambda v: v is None or v >= 0, ">= 0"),  # None: auto
    (("m_moco", "max_bad_fraction"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("t_moco", "knn_temperature"), lambda v: v > 0, "> 0"),
    (("lr_per_256",), lambda v: v is None or v > 0, "> 0"),
    (("warmup_fraction",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("momentum",), lambda v: v < 1, "< 1"),
    (("eval_crop_pct",), lambda v: 0 < v <= 1, "in (0, 1] (1: no crop)"),
)


def validate(config: TrainConfig) -> None:
    """Checks that need no model, data or processes; one ConfigError line each."""
    values = config.options()
    for names, test, wanted in _RANGES:
        for name in names:
            if not test(values[name]):
                raise ConfigError(f"option {name} must be {wanted}, got {values[name]}")
    run, method, optimization, evaluation = config.run, config.method, config.optimization, config.evaluation
    if run.compile_mode != "default" and not run.compile:
        raise ConfigError(f"option compile_mode={run.compile_mode} needs --compile; add it, or leave --compile_mode out")
    if optimization.batch_size % method.bn_splits or method.bn_splits < 1:
        raise ConfigError(f"option bn_splits must be >= 1 and divide batch_size {optimization.batch_size}, "
                          f"got {method.bn_splits}")
    try:
        validate_mixing_sizes(queue_size=method.k_moco, queue_name="k_moco", temperature=method.t_moco,
                              n_hard=method.n_hard, **negative_counts(method))
    except ValueError as error:
        raise ConfigError(f"option {error}") from None
    for kind in NEGATIVE_TYPES.values():
        if not _START.fullmatch(_start_text(method, kind)):
            raise ConfigError(f"option {kind.start_option} must be a step (e.g. 5000) or a number of epochs (e.g. "
                              f"10ep), got {_start_text(method, kind)!r}")
    if run.resume is None:  # a resumed run may have changed --steps: judged once the checkpoint is known
        for kind, step in zip(NEGATIVE_TYPES.values(), curriculum_steps(method, steps_per_epoch=None)):
            problem = curriculum_problem(method, optimization.steps, kind, step)
            if problem:
                raise ConfigError(problem)
    if evaluation.knn_split is not None and evaluation.knn_split == config.data.split:
        raise ConfigError(f"option knn_split: {evaluation.knn_split} is the split trained on, the kNN bank, where "
                          "every query would find itself; choose another split (e.g. test), or leave it out to hold "
                          "out a part of it")
    size = evaluation.eval_split_size
    if not size > 0 or (size >= 1 and not size.is_integer()):
        raise ConfigError(f"option eval_split_size must be a fraction in (0, 1) or a whole count, got {size}")
    if config.hub.push_to_hub and not config.hub.hub_model_id:
        raise ConfigError("option push_to_hub needs --hub_model_id user/name")
    if run.stop_at is not None and not 1 <= run.stop_at <= optimization.steps:
        raise ConfigError(f"option stop_at must be in [1, steps={optimization.steps}], got {run.stop_at}")
    if run.device is not None and run.device != "cpu" and not run.device.isdigit():
        raise ConfigError(f"option device must be `cpu` or a GPU index, got {run.device!r}")
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
    return start_step(config.evaluation.eval_every, steps_per_epoch)


def knn_monitor_on(config: TrainConfig) -> bool:
    """Whether `--eval_every` asks for the kNN monitor (anything but 0 steps or 0 epochs)."""
    return bool(eval_every_steps(config, steps_per_epoch=1))


def negative_counts(method: MethodConfig) -> dict[str, int]:
    """Each registered negative type's count per query by its option (s1_hard, s2_hard, ...); 0 for
    a type the config has no option for."""
    return {t.count_option: getattr(method, t.count_option, 0) for t in NEGATIVE_TYPES.values()}


def _start_text(method: MethodConfig, kind: NegativeType) -> str:
    return getattr(method, kind.start_option, "0")


def curriculum_steps(method: MethodConfig, *, steps_per_epoch: Optional[int]) -> tuple[Optional[int], ...]:
    """The first step of each negative type in the registry's order ((type 1, type 2) for MoCHi),
    None where an epoch count awaits steps_per_epoch."""
    return tuple(start_step(_start_text(method, t), steps_per_epoch) for t in NEGATIVE_TYPES.values())


def curriculum_problem(method: MethodConfig, steps: int, kind: NegativeType, step: Optional[int]) -> Optional[str]:
    """The line refusing a negative type that is asked for (count > 0) but would start at or after
    the last of `steps`, so that the run would silently train without it; else None."""
    if step is None or not negative_counts(method)[kind.count_option] or step < steps:
        return None
    given = _start_text(method, kind)
    shown = given if given.isdigit() else f"{given} = step {step}"
    return (f"option {kind.start_option}={shown} is at or past the end of the run (--steps {steps}): "
            f"{kind.label} negatives would never be used; start it earlier (a step below {steps}, "
            f"or epochs such as 10ep), or pass --{kind.count_option} 0 to train without them")


def check_queue_fits_global_batch(config: TrainConfig, num_processes: int) -> None:
    global_batch = config.optimization.batch_size * num_processes
    if config.method.k_moco % global_batch:
        suggestion = max(1, config.method.k_moco // global_batch) * global_batch
        raise ConfigError(
            f"option k_moco={config.method.k_moco} must be a multiple of the global batch {global_batch} "
            f"(batch_size {config.optimization.batch_size} x {num_processes} processes); try --k_moco {suggestion}"
        )


CONFIG_FILE = "config.yaml"


# Options that say how one invocation starts, not what the run is: left out of the saved
# config.yaml, so that `--config DIR_OUT/config.yaml --dir_out NEW` starts the same run afresh.
INVOCATION_ONLY = ("resume", "overwrite_dir_out", "config")


def run_options(config: TrainConfig) -> dict[str, Any]:
    """The options that describe the run, by flat name: all but INVOCATION_ONLY."""
    return {name: value for name, value in config.options().items() if name not in INVOCATION_ONLY}


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved configuration of the run (`run_options`) in its groups, loadable again with
    `--config`."""
    grouped = {group: {name: value for name, value in options.items() if name not in INVOCATION_ONLY}
               for group, options in config.to_dict().items()}
    return yaml.dump(grouped, Dumper=_FlowListDumper, sort_keys=False)


class _FlowListDumper(yaml.SafeDumper):
    """YAML with a group's options one per line and a list of numbers on one: [0.2, 1.0]."""


_FlowListDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def config_differences(saved: dict[str, Any], current: TrainConfig, *, resumable: bool = False) -> list[str]:
    """`name: saved -> current` for every option of the run (`run_options`; a checkpoint of an
    older hnmix may still hold the others) that differs and may not change on resume (or, with
    resumable=True, that differs and may). `saved` is a config.yaml's mapping, grouped or flat. An
    option the saved config lacks (it is newer than the checkpoint) counts as its default, which is
    what the saved run did."""
    now, defaults, saved = run_options(current), TrainConfig().options(), flat_options(saved)
    saved = {name: saved.get(name, defaults[name]) for name in now}
    return [f"{name}: {saved[name]!r} -> {now[name]!r}" for name in now
            if (name in RESUMABLE_CHANGES) == resumable and _spelt_alike(name, saved[name]) != _spelt_alike(name, now[name])]


def _spelt_alike(name: str, value: Any) -> Any:
    """`value` of option `name` in the one spelling of its parser (`option(parse=...)`), when it
    has one and the value parses: an older config.yaml's eval_every 1000 equals "1000"."""
    parse = _metadata(name)["parse"]
    if parse is None or value is None:
        return value
    try:
        return parse(value)
    except ConfigError:
        return value
