"""`--protocol lincls`: the linear evaluation that MoCo, MoCHi, solo-learn and lightly report (see
the README): an `nn.Linear` ([B, D] -> [B, C]) trained with MoCo's `main_lincls.py` settings on
views drawn afresh every epoch through the FROZEN backbone (eval mode, no gradient), so the
features are never precomputed. The data path is the trainer's: uint8 crops from the workers
(`hnmix.data.geometric.one_crop`), normalised on the accelerator.

A resumed run ends with the classifier of an uninterrupted one, since the epoch order comes from
(seed + epoch) (`EpochSampler`), each view from (seed, epoch, index) (`sample_rng`), the lr from
the epoch, and the momentum buffers are saved (`_save`): there is no RNG state to save. A run
interrupted inside an epoch repeats that epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import datasets
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
from accelerate import Accelerator

from hnmix.data.augmentation import MOCO_V2
from hnmix.data.geometric import one_crop, one_crop_of_pixels
from hnmix.data.images import DECODE_ERRORS
from hnmix.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from hnmix.data.two_views import EpochSampler, TwoViewDataset, sample_rng, warn_a_few
from hnmix.data.workers import fit_prefetch, ignore_stop_signals, local_processes
from hnmix.errors import CheckpointError, ConfigError, DataError, describe, first_line
from hnmix.evaluate.features import (
    UNREADABLE,
    EvalImages,
    Normalization,
    extract_features,
    main_process_buffers,
    make_eval_loader,
    normalize_uint8,
)
from hnmix.evaluate.monitor import broadcast_from_main
from hnmix.evaluate.probes import top_k_accuracy

logger = logging.getLogger("hnmix.evaluate")

SCHEDULES = ("step", "cosine")
STEP_MILESTONES = (0.6, 0.8)  # of the epochs: moco/main_lincls.py's --schedule 60 80 of 100 epochs
STATE_FILE = "lincls_state.json"
CLASSIFIER_FILE = "classifier.safetensors"
METRICS_FILE = "metrics.jsonl"
BACKBONE_KEY = "backbone_sha256"  # in the identity: `backbone_sha256` of the weights the classifier was trained on
# Settings an older hnmix did not record in a saved run's identity, as it used them.
UNRECORDED_IDENTITY = {"eval_crop_pct": EVAL_CROP_PCT}
_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")
# moco/main_lincls.py's training view: RandomResizedCrop (scale 0.08-1) and a flip; no photometric half.
LINCLS_AUGMENTATION = replace(MOCO_V2, crop_scale=(0.08, 1.0), flip_p=0.5)
# How the training views are drawn, saved with each epoch (a resume warns when they differ).
TRAIN_VIEWS = "hnmix.data.geometric.one_crop, uint8, normalised on the accelerator"


@dataclass(frozen=True)
class LinclsSettings:
    """The options of one lincls run (see the --lincls_* options); batch_size is global, as in MoCo."""

    epochs: int = 100
    lr: float = 30.0
    batch_size: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "step"
    seed: int = 0
    stop_at: Optional[int] = None

    def check(self, num_processes: int) -> None:
        """One-line ConfigErrors for impossible settings, before any compute."""
        if self.epochs < 1:
            raise ConfigError(f"option lincls_epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"option lincls_lr must be a positive number, got {self.lr}")
        if not self.weight_decay >= 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"options lincls_weight_decay must be >= 0 and lincls_momentum in [0, 1), got "
                              f"{self.weight_decay} and {self.momentum}")
        if self.batch_size < 1 or self.batch_size % num_processes:
            raise ConfigError(f"option lincls_batch_size ({self.batch_size}, all processes together) must be a "
                              f"positive multiple of the {num_processes} processes; pass e.g. "
                              f"--lincls_batch_size {max(1, self.batch_size // num_processes) * num_processes}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.epochs:
            raise ConfigError(f"option lincls_stop_at must lie in 1..{self.epochs} (lincls_epochs), got {self.stop_at}")

    def milestones(self) -> tuple[int, ...]:
        """Epochs at which the step schedule multiplies the lr by 0.1."""
        return tuple(round(fraction * self.epochs) for fraction in STEP_MILESTONES)

    def lr_at(self, epoch: int) -> float:
        """The lr of epoch `epoch` (0-based), constant within the epoch as in MoCo (cosine: main_moco.py's --cos)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.lr * 0.1 ** sum(epoch >= milestone for milestone in self.milestones())

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one (everything but stop_at)."""
        return {k: v for k, v in asdict(self).items() if k != "stop_at"}


class AugmentedImages(TwoViewDataset):
    """The lincls training view of row i of a labelled `datasets.Dataset`, drawn afresh per epoch.

    `__getitem__(epoch * len(self) + index)` (what `EpochSampler` yields) -> (image uint8 [3, S, S],
    label int), drawn from `sample_rng(seed, epoch, index)`: the same view whichever worker or
    process loads it. Normalise the batches with `normalize_uint8(images, *self.normalization)`.
    An unreadable image comes as a blank one labelled UNREADABLE (no loss; counted).
    """

    def __init__(self, dataset: datasets.Dataset, *, image_column: str, label_column: str, img_size: int, seed: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 in_memory_bytes: int = 0):
        super().__init__(dataset, image_column=image_column, label_column=label_column, img_size=img_size, seed=seed,
                         augmentation=LINCLS_AUGMENTATION, in_memory_bytes=in_memory_bytes)
        self.normalization: Normalization = (tuple(mean), tuple(std))

    def batch_bytes(self, batch_size: int) -> int:
        """Bytes of one collated batch: images uint8 [B, 3, S, S] and labels [B] int64."""
        return batch_size * (3 * self.img_size**2 + 8)

    def __getitem__(self, encoded_index: int) -> tuple[torch.Tensor, int]:
        epoch, index = divmod(int(encoded_index), len(self))
        try:
            return self._view_and_label(index, sample_rng(self.seed, epoch, index))
        except (DataError, *DECODE_ERRORS) as error:
            reported = error if isinstance(error, DataError) else self._unreadable(index, error)
            warn_a_few(self.warned, f"{first_line(reported)}; it adds no loss to lincls",
                       counted_in="bad_samples in the lincls metrics.jsonl")
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), UNREADABLE

    def _view_and_label(self, index: int, rng) -> tuple[torch.Tensor, int]:
        if self.decoded is not None:
            view = one_crop_of_pixels(self.decoded.pixels_of(index), self.img_size, rng,
                                      augmentation=self.augmentation)
            return view, int(self.labels[index])
        row = self._read_row(index)
        return self._crops_of_cell(row[self.image_column], index, rng, cut=one_crop), int(row[self.label_column])


def make_lincls_loader(images: AugmentedImages, *, batch_size: int, num_workers: int, seed: int,
                       processes_on_node: int = 1) -> torch.utils.data.DataLoader:
    """Batches (images uint8 [b, 3, S, S], labels [b] int64) of `batch_size` per process in an
    `EpochSampler` order, the last one possibly smaller (as MoCo), as many ready per worker as fit
    in /dev/shm (`fit_prefetch`). Prepare it with `accelerator.prepare`; `set_epoch` before each pass."""
    prefetch = None
    if num_workers > 0:
        prefetch = fit_prefetch(images.batch_bytes(batch_size), num_workers, processes=processes_on_node).prefetch_factor
    return torch.utils.data.DataLoader(
        images, batch_size=batch_size, sampler=EpochSampler(len(images), seed), drop_last=False,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        prefetch_factor=prefetch, generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals,
    )


def saved_epochs(lincls_dir: Path) -> Optional[Path]:
    """The newest complete `epoch_NNNN` directory under `lincls_dir`, or None."""
    if not lincls_dir.is_dir():
        return None
    found = [p for p in lincls_dir.iterdir() if p.is_dir() and _EPOCH_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(_EPOCH_DIR.match(p.name).group(1)), default=None)


def backbone_sha256(backbone: nn.Module) -> str:
    """sha256 of the backbone's state dict (names, dtypes, shapes, bytes): a resume needs the same weights."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_lincls_dir(lincls_dir: Path, identity: dict[str, Any], *, resume: bool) -> Optional[Path]:
    """The saved state to resume from (None: a fresh start); one-line ConfigErrors before any compute:
    a directory that cannot be written, a fresh start over a saved run, --resume with nothing saved,
    and a resume with other settings or backbone weights (`identity`) than the saved run's."""
    folder = lincls_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if (lincls_dir.exists() and not lincls_dir.is_dir()) or not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write the linear classifier to {lincls_dir} (not a writable directory); "
                          "pass --lincls_dir DIR")
    saved = saved_epochs(lincls_dir)
    if saved is None:
        if resume:
            raise ConfigError(f"--resume: no saved lincls state under {lincls_dir}; start without --resume")
        return None
    state = json.loads((saved / STATE_FILE).read_text())
    state["identity"] = UNRECORDED_IDENTITY | state["identity"]
    if state["identity"].get(BACKBONE_KEY) != identity.get(BACKBONE_KEY):
        why = ("the model was exported or trained again since, or is another one" if state["identity"].get(BACKBONE_KEY)
               else "an older hnmix did not record which weights")
        raise ConfigError(f"{lincls_dir} holds a linear classifier of other backbone weights ({why}); delete "
                          f"{lincls_dir} or pass another --lincls_dir to start afresh")
    if not resume:
        raise ConfigError(f"{lincls_dir} already holds a lincls run ({state['epochs_done']} of "
                          f"{state['identity'].get('epochs')} epochs); pass --resume to continue it, or another "
                          "--lincls_dir")
    differing = [f"{k} {state['identity'].get(k)!r} -> {v!r}" for k, v in identity.items()
                 if state["identity"].get(k) != v]
    if differing:
        raise ConfigError(f"--resume: the run saved in {lincls_dir} had other settings ({'; '.join(differing)}); "
                          "pass the saved ones, or another --lincls_dir to start afresh")
    return saved


def _save(accelerator: Accelerator, lincls_dir: Path, classifier: nn.Module, optimizer: torch.optim.Optimizer,
          epochs_done: int, identity: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write epoch_NNNN/ (complete before the older one goes) and a copy of its classifier in
    `lincls_dir`; call it on every rank. The main process writes alone: DDP keeps the classifier and
    the optimizer identical on every rank. epoch_NNNN/ holds classifier.safetensors (weight [C, D],
    bias [C]), optimizer.safetensors (state tensors as "INDEX.NAME") and lincls_state.json (epochs
    done, identity, `TRAIN_VIEWS`, param_groups, an fp16 loss scaler's state).
    """
    from safetensors.torch import save_file

    problem = None
    if accelerator.is_main_process:
        final = lincls_dir / f"epoch_{epochs_done:04d}"
        partial = lincls_dir / f".partial-{final.name}"
        linear = accelerator.unwrap_model(classifier)
        weights = {name: t.detach().float().cpu().contiguous() for name, t in linear.state_dict().items()}
        optimizer_state = optimizer.state_dict()
        state_tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
                         for index, state in optimizer_state["state"].items() for name, value in state.items()
                         if torch.is_tensor(value)}
        record = {"epochs_done": epochs_done, "identity": identity, "train_views": TRAIN_VIEWS,
                  "param_groups": optimizer_state["param_groups"],
                  "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            save_file(weights, str(partial / CLASSIFIER_FILE), metadata=metadata | {"epochs_done": str(epochs_done)})
            save_file(state_tensors, str(partial / "optimizer.safetensors"))
            (partial / STATE_FILE).write_text(json.dumps(record) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            shutil.copyfile(final / CLASSIFIER_FILE, lincls_dir / f".{CLASSIFIER_FILE}")
            os.replace(lincls_dir / f".{CLASSIFIER_FILE}", lincls_dir / CLASSIFIER_FILE)
            for older in lincls_dir.iterdir():
                match = _EPOCH_DIR.match(older.name)
                if match and older.is_dir() and int(match.group(1)) < epochs_done:
                    shutil.rmtree(older)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            problem = describe(error)
    problem = broadcast_from_main(problem, accelerator)
    if problem:
        raise CheckpointError(f"could not save the linear classifier after epoch {epochs_done} in {lincls_dir} "
                              f"({problem}); free space or pass another --lincls_dir, then --resume")


def _load(saved: Path, classifier: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> int:
    """Load what `_save` wrote in `saved` on this rank; returns the epochs done."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        record = json.loads((saved / STATE_FILE).read_text())
        accelerator.unwrap_model(classifier).load_state_dict(load_file(saved / CLASSIFIER_FILE))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in load_file(saved / "optimizer.safetensors").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
        if accelerator.scaler is not None and record.get("scaler"):
            accelerator.scaler.load_state_dict(record["scaler"])
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as error:
        raise ConfigError(f"cannot resume from {saved} ({describe(error)}); pass another --lincls_dir "
                          "to start afresh") from None
    epochs_done = int(record["epochs_done"])
    if record.get("train_views") != TRAIN_VIEWS:
        drawn = record.get("train_views") or "torchvision's RandomResizedCrop on PIL images (an older hnmix)"
        logger.warning(f"lincls: the {epochs_done} epoch(s) saved in {saved} were trained on views drawn by {drawn}; "
                       f"the epochs from {epochs_done + 1} on are drawn by {TRAIN_VIEWS} (the same distribution), so "
                       "the classifier will not be bit for bit that of an uninterrupted run")
    return epochs_done


@contextmanager
def _frozen(backbone: nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """The backbone in eval mode, without gradients, with the main process's buffers; as it was afterwards."""
    was_training = backbone.training
    requires_grad = [p.requires_grad for p in backbone.parameters()]
    backbone.eval().requires_grad_(False)
    try:
        with main_process_buffers(backbone, accelerator):
            yield
    finally:
        backbone.train(was_training)
        for parameter, flag in zip(backbone.parameters(), requires_grad):
            parameter.requires_grad_(flag)


def feature_dim(backbone: nn.Module) -> int:
    """D of the backbone's pooled output [B, D] (timm: head_hidden_size where the head has one, as MambaOut)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def train_lincls(
    backbone: nn.Module,
    train_images: AugmentedImages,
    test_images: EvalImages,
    accelerator: Accelerator,
    *,
    num_classes: int,
    settings: LinclsSettings,
    lincls_dir: Path,
    resume_from: Optional[Path],
    identity: dict[str, Any],
    num_workers: int,
    eval_batch_size: int,
    metadata: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Train the linear classifier on the frozen `backbone` ([B, 3, S, S] -> [B, D]) and test it on
    `test_images` (the reported split); `resume_from` comes from `check_lincls_dir`. Call it on
    every rank; each returns the same {"lincls_top1", "lincls_top5" (percent), "lincls_test_images",
    "lincls_epochs_done", "lincls_train_loss", "lincls_train_top1" (the last epoch trained; None when
    none was), "lincls_dir", "eval_bad_samples"}. The backbone is left as it was found.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init would draw from the caller's stream
        classifier = nn.Linear(feature_dim(backbone), num_classes)
    generator = torch.Generator().manual_seed(settings.seed)  # the same start on every rank
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    loader = make_lincls_loader(train_images, batch_size=settings.batch_size // accelerator.num_processes,
                                num_workers=num_workers, seed=settings.seed,
                                processes_on_node=local_processes(accelerator.num_processes))
    classifier, optimizer, loader = accelerator.prepare(classifier, optimizer, loader)
    start = _load(resume_from, classifier, optimizer, accelerator) if resume_from is not None else 0
    end = settings.stop_at or settings.epochs
    metrics_path = lincls_dir / METRICS_FILE
    if accelerator.is_main_process:
        lincls_dir.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.is_file() else [])
                if json.loads(line)["epoch"] < start]  # a resume repeats what came after its state
        metrics_path.write_text("".join(line + "\n" for line in kept))
    logger.info(f"lincls: {len(train_images)} training images, global batch {settings.batch_size} on "
                f"{accelerator.num_processes} process(es), SGD lr {settings.lr} ({settings.schedule}), momentum "
                f"{settings.momentum}, weight decay {settings.weight_decay}, epochs {start} -> {end} of "
                f"{settings.epochs}, mixed precision {accelerator.mixed_precision}, saved in {lincls_dir}")

    progress = Progress(
        TextColumn("lincls epoch {task.fields[epoch]}"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not accelerator.is_main_process,
    )
    task = progress.add_task("lincls", total=len(loader) * (end - start), epoch="-", loss="-", lr="-")
    last: dict[str, Any] = {"lincls_train_loss": None, "lincls_train_top1": None}
    classifier.train()
    with _frozen(backbone, accelerator), progress:
        for epoch in range(start, end):
            lr = settings.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            progress.update(task, epoch=f"{epoch + 1}/{settings.epochs}", lr=f"{lr:.3g}")
            loader.set_epoch(epoch)
            totals = torch.zeros(4, device=accelerator.device)  # summed loss, right answers, images, unreadable
            for images, labels in loader:
                with torch.no_grad():
                    images = normalize_uint8(images, *train_images.normalization)  # [b, 3, S, S] float32
                    with accelerator.autocast():
                        features = backbone(images)
                logits = classifier(features.float().flatten(1))  # [b, C]
                readable = labels != UNREADABLE  # [b]
                losses = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")  # [b]
                loss = (losses * readable).sum() / readable.sum().clamp_min(1)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                totals += torch.stack([(losses.detach() * readable).sum(),
                                       ((logits.argmax(1) == labels) & readable).sum().float(),
                                       readable.sum().float(), (~readable).sum().float()])
                progress.advance(task)
            loss_sum, correct, seen, skipped = accelerator.reduce(totals, reduction="sum").tolist()
            seen = max(seen, 1.0)
            last = {"lincls_train_loss": loss_sum / seen, "lincls_train_top1": 100.0 * correct / seen}
            progress.update(task, loss=f"{last['lincls_train_loss']:.4f}")
            record = {"epoch": epoch, "lr": lr, "loss": last["lincls_train_loss"],
                      "train_top1": last["lincls_train_top1"], "bad_samples": int(skipped)}
            if accelerator.is_main_process:
                with metrics_path.open("a") as file:
                    file.write(json.dumps(record) + "\n")
            logger.info(f"lincls epoch {epoch + 1}/{settings.epochs}  lr {lr:.4g}  loss {record['loss']:.4f}  "
                        f"train top-1 {record['train_top1']:.2f} (augmented views)")
            _save(accelerator, lincls_dir, classifier, optimizer, epoch + 1, identity, metadata or {})
    if end < settings.epochs:
        logger.warning(f"lincls stopped after epoch {end} of {settings.epochs} (--lincls_stop_at); the numbers "
                       f"below are those of an unfinished classifier: continue with --resume")

    test_loader = accelerator.prepare(make_eval_loader(test_images, batch_size=eval_batch_size,
                                                       num_workers=num_workers))
    normalization = test_images.normalization if test_images.as_uint8 else None
    extracted = extract_features(backbone, test_loader, accelerator, normalization=normalization)
    features, labels = extracted  # [N, D], [N]: every readable sample once
    classifier.eval()
    with torch.no_grad():
        logits = torch.cat([classifier(chunk) for chunk in features.split(4096)]).float()  # [N, C]
    top1, top5 = top_k_accuracy(logits, labels)
    return {"lincls_top1": top1, "lincls_top5": top5, "lincls_test_images": len(labels), "lincls_epochs_done": end,
            **last, "lincls_dir": str(lincls_dir), "eval_bad_samples": extracted.skipped}
