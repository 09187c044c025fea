"""The encoder on the Hugging Face Hub: export in timm's layout, a model card, background pushes.

`export_encoder` writes `config.json` and `model.safetensors` with `timm.models.save_for_hf`, so
`timm.create_model("local-dir:DIR", pretrained=True)` (or `hf-hub:user/name` once pushed) gives
the trained backbone, classifier-free (`num_classes=0`): a feature extractor.

`write_model_card` adds the `README.md` the Hub shows (metadata, training setup, evaluation,
how to load). `HubPusher` uploads from the main process in one background thread, so training
never waits on the network; the way train.py is meant to use it:

    pusher = HubPusher(repo_id, strategy="every_save")
    pusher.check()                                   # before training: HubError, one line
    ...                                              # at each checkpoint (main process):
    write_model_card(encoder_dir, config=config.to_dict(), results=..., repo_id=repo_id)
    pusher.on_save(step, encoder_dir=encoder_dir, checkpoint_dir=checkpoint)
    ...                                              # at the end:
    pusher.on_train_end(step, encoder_dir=encoder_dir, checkpoint_dir=checkpoint)
    pusher.wait(timeout=...)                         # logs the outcome; False if a push failed

Strategies, as the `hub_strategy` of transformers' Trainer: `end` pushes the encoder and card
once, at the end; `every_save` also at every checkpoint; `checkpoint` also uploads the newest
full training state under `last-checkpoint/` with each push, so a run can resume from the Hub
copy (`hf download REPO --include "last-checkpoint/*" --local-dir X`, then
`--resume X/last-checkpoint`). That state includes the checkpoint's `config.yaml`, local paths
(`dir_out`, `dir_data`) included: push it to a private repository if that matters.

Logging goes through `logging.getLogger(__name__)`, not accelerate's logger: the pusher lives on
the main process only and logs from its worker thread, where accelerate's main-process filter
would need an initialised accelerate state (tests have none).

Facts of huggingface_hub 2.x found here: its HTTP client (httpx2) has no timeout, so
`HfApi().whoami()` against a server that accepts the connection and never answers hangs for
good (observed > 30 s), while a failed DNS lookup fails at once (0.15 s, no retries), as does
`HF_HUB_OFFLINE` (`OfflineModeIsEnabled`). httpx2's errors are not `OSError`s. `check()`
therefore runs its network calls in a helper thread and gives up after `check_timeout_s`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import huggingface_hub
import torch
import torch.nn as nn
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from timm.models import save_for_hf

from hnmix.augment import IMAGENET_MEAN, IMAGENET_STD
from hnmix.errors import HubError, describe, network_error_types

logger = logging.getLogger(__name__)


def export_encoder(backbone: nn.Module, directory: str | Path, *, img_size: int) -> Path:
    """Save `backbone` (a timm model) to `directory`; returns the directory.

    The preprocessing recorded in config.json is the one hnmix evaluates with: resize to
    img_size * 256/224, centre crop img_size, ImageNet mean and std. A channels_last backbone is
    saved from a contiguous copy (safetensors stores contiguous tensors only).
    """
    directory = Path(directory)
    if any(not p.is_contiguous() for p in backbone.parameters()):
        backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    data_config = {"input_size": (3, img_size, img_size), "crop_pct": 224 / 256,
                   "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    save_for_hf(backbone, str(directory), safe_serialization=True, data_config=data_config)
    return directory


# ----------------------------------------------------------------------------- model card

MODEL_CARD_TAGS = ("image-feature-extraction", "timm", "self-supervised", "moco", "mochi", "hnmix")
PAPER_URL = "https://arxiv.org/abs/2010.01028"

# (option, what it means) in the order the card lists them.
_MOCO_PARAMETERS = (
    ("dim_moco", "projection output size (the head is not part of this model)"),
    ("k_moco", "queue size K (negatives per query)"),
    ("m_moco", "momentum of the key encoder"),
    ("t_moco", "softmax temperature"),
)
_MOCHI_PARAMETERS = (
    ("n_hard", "hardest queue negatives mixed per query"),
    ("s1_hard", "type-1 synthetic negatives per query (two hard negatives mixed)"),
    ("s2_hard", "type-2 synthetic negatives per query (query mixed with a hard negative)"),
    ("start1_hard", "first step with type-1 negatives"),
    ("start2_hard", "first step with type-2 negatives"),
)
# (results key prefix, row name); accuracies are percentages, `{prefix}_top1` / `{prefix}_top5`.
_EVALUATIONS = (("knn", "kNN"), ("linear", "linear probe"))


def dataset_is_hub_id(dataset: str) -> bool:
    """True when `dataset` names a Hub dataset: not `synthetic`, not an existing or path-like
    local path, and a valid repo id (`name` or `owner/name`)."""
    if dataset == "synthetic" or dataset.startswith(("/", ".", "~")) or Path(dataset).exists():
        return False
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return False
    return True


def write_model_card(directory: str | Path, *, config: dict[str, Any], results: Optional[dict[str, Any]] = None,
                     repo_id: Optional[str] = None) -> Path:
    """Write `directory/README.md`, the Hub model card of an exported encoder; returns its path.

    config: the training options (`TrainConfig.to_dict()`); only the dataset, split, arch,
    img_size, steps, batch and MoCo/MoCHi options are used, never paths or the environment.
    results: optional `knn_top1`, `knn_top5`, `knn_k`, `linear_top1`, `linear_top5` (accuracies in
    percent, 0-100), `steps` (steps actually trained), `global_batch`, `num_processes`,
    `eval_split`. repo_id: the Hub id the loading example names (else a placeholder).
    """
    results = dict(results or {})
    dataset = str(config.get("dataset", ""))
    card_data = ModelCardData(
        library_name="timm",
        tags=list(MODEL_CARD_TAGS),
        datasets=[dataset] if dataset_is_hub_id(dataset) else None,
        pipeline_tag="image-feature-extraction",
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{_card_body(config, results, repo_id)}")
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def _card_body(config: dict[str, Any], results: dict[str, Any], repo_id: Optional[str]) -> str:
    arch = config.get("arch", "unknown")
    title = repo_id.split("/")[-1] if repo_id else f"{arch} trained with hnmix"
    sections = [
        f"# {title}\n",
        f"An image encoder (`{arch}`, timm) trained without labels with MoCo v2 and MoCHi hard negative "
        f"mixing ([Kalantidis et al., *Hard Negative Mixing for Contrastive Learning*, NeurIPS 2020]({PAPER_URL})), "
        "trained with hnmix. It has no classifier (`num_classes=0`): it maps an image to one "
        "feature vector, for retrieval, kNN, clustering or a linear probe. The projection head and the "
        "momentum encoder used in training are not included.\n",
        "## Training\n",
        _training_table(config, results),
        "## Evaluation\n\n" + _evaluation_table(results) if _has_evaluation(results) else "",
        "## How to use\n",
        _usage(repo_id, config),
        "## Citation\n",
        "```bibtex\n@inproceedings{kalantidis2020hard,\n"
        "  title={Hard Negative Mixing for Contrastive Learning},\n"
        "  author={Kalantidis, Yannis and Sariyildiz, Mert Bulent and Pion, Noe and Weinzaepfel, Philippe and Larlus, Diane},\n"
        "  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},\n  year={2020}\n}\n```\n",
    ]
    return "\n".join(section for section in sections if section)


def _describe_dataset(config: dict[str, Any]) -> str:
    dataset = str(config.get("dataset", ""))
    if dataset_is_hub_id(dataset):
        name = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
    elif dataset == "synthetic":
        name = "`synthetic` (images generated in memory by hnmix, for demos and tests)"
    else:
        name = "a local dataset"
    split = config.get("split")
    return f"{name}, split `{split}`" if split else name


def _training_table(config: dict[str, Any], results: dict[str, Any]) -> str:
    rows = [("dataset", _describe_dataset(config), ""), ("architecture", f"`{config.get('arch')}`", "timm model name")]
    if config.get("img_size") is not None:
        rows.append(("image size", f"{config['img_size']} x {config['img_size']}", ""))
    scheduled = config.get("steps")
    trained = results.get("steps", config.get("stop_at") or scheduled)
    if trained is not None:
        rows.append(("optimizer steps", f"{trained}", f"of {scheduled} scheduled" if scheduled and trained != scheduled else ""))
    global_batch = results.get("global_batch", config.get("global_batch"))
    processes = results.get("num_processes", config.get("num_processes"))
    if global_batch is None and processes and config.get("batch_size"):
        global_batch = config["batch_size"] * processes
    if global_batch is not None:
        rows.append(("global batch", f"{global_batch}", f"{processes} processes" if processes else ""))
    elif config.get("batch_size") is not None:
        rows.append(("batch per process", f"{config['batch_size']}", ""))
    for name, meaning in _MOCO_PARAMETERS + _MOCHI_PARAMETERS:
        if name in config:
            rows.append((f"`{name}`", f"{config[name]}", meaning))
    lines = ["| setting | value | meaning |", "|---|---|---|"] + [f"| {key} | {value} | {meaning} |"
                                                                 for key, value, meaning in rows]
    return "\n".join(lines) + "\n"


def _has_evaluation(results: dict[str, Any]) -> bool:
    return any(f"{prefix}_top{k}" in results for prefix, _ in _EVALUATIONS for k in (1, 5))


def _format_accuracy(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}"


def _evaluation_table(results: dict[str, Any]) -> str:
    lines = ["| protocol | top-1 (%) | top-5 (%) |", "|---|---|---|"]
    for prefix, label in _EVALUATIONS:
        if f"{prefix}_top1" in results or f"{prefix}_top5" in results:
            if prefix == "knn" and results.get("knn_k"):
                label = f"kNN (k={results['knn_k']})"
            lines.append(f"| {label} | {_format_accuracy(results.get(f'{prefix}_top1'))} "
                         f"| {_format_accuracy(results.get(f'{prefix}_top5'))} |")
    note = f"\nOn split `{results['eval_split']}`.\n" if results.get("eval_split") else ""
    return "\n".join(lines) + "\n" + note


def _usage(repo_id: Optional[str], config: dict[str, Any]) -> str:
    name = f"hf-hub:{repo_id}" if repo_id else "hf-hub:USER/MODEL"
    size = config.get("img_size")
    preprocessing = (f"resize to {round(size * 256 / 224)}, centre crop {size}, ImageNet mean and std"
                     if size else "resize, centre crop, ImageNet mean and std")
    return (
        f"The preprocessing ({preprocessing}) is recorded in `config.json`; timm resolves it:\n\n"
        "```python\n"
        "import timm\nimport torch\nfrom PIL import Image\n\n"
        f'model = timm.create_model("{name}", pretrained=True, num_classes=0).eval()\n'
        "data_config = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**data_config, is_training=False)\n"
        'image = Image.open("image.jpg").convert("RGB")\n'
        "with torch.no_grad():\n"
        "    features = model(transform(image).unsqueeze(0))  # [1, model.num_features]\n"
        "```\n"
    )


# ----------------------------------------------------------------------------- pushing

STRATEGIES = ("end", "every_save", "checkpoint")
LAST_CHECKPOINT = "last-checkpoint"
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")


@dataclasses.dataclass
class UploadResult:
    """The outcome of one requested push. status: `pushed`, `failed` or `skipped` (replaced by a
    newer request before it started). commit: the commit URL (or id) the Hub returned."""

    folder: str
    path_in_repo: str
    commit_message: str
    status: str = "pending"
    attempts: int = 0
    error: Optional[str] = None
    commit: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "pushed"


@dataclasses.dataclass
class _Upload:
    snapshot: Path
    result: UploadResult
    delete_patterns: Optional[list[str]] = None


class HubPusher:
    """Uploads folders to one Hub model repository in a background thread (main process only).

    One upload runs at a time; a push requested meanwhile waits as the single pending one, and a
    newer request replaces it (the replaced one is logged and recorded as skipped). `push` copies
    the folder to a private snapshot first, so the trainer may rewrite or prune it at once.
    Failures are retried `max_attempts` times, sleeping `backoff_s * 2**attempt`, then logged:
    nothing raised, local files untouched. `history` lists every request's UploadResult.
    """

    def __init__(self, repo_id: str, *, private: bool = False, strategy: str = "end", token: Optional[str] = None,
                 api: Any = None, max_attempts: int = 4, backoff_s: float = 2.0, check_timeout_s: float = 20.0,
                 staging_dir: Optional[str | Path] = None) -> None:
        """staging_dir: where snapshots are made (default: the system temp directory); on the same
        filesystem as the checkpoints, their files are hard-linked instead of copied."""
        if strategy not in STRATEGIES:
            raise HubError(f"hub strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.repo_id = repo_id
        self.private = private
        self.strategy = strategy
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.check_timeout_s = check_timeout_s
        self.staging_dir = Path(staging_dir) if staging_dir is not None else None
        self._token = token or None
        self._known_token = self._token or _token_or_none()  # only to scrub it from what we log
        self.api = api if api is not None else huggingface_hub.HfApi(token=self._token)
        self.history: list[UploadResult] = []
        self._changed = threading.Condition()
        self._pending: Optional[_Upload] = None
        self._in_flight: Optional[_Upload] = None
        self._worker: Optional[threading.Thread] = None
        self._failures_reported: set[int] = set()  # id() of the failed results wait() has logged

    @property
    def results(self) -> list[UploadResult]:
        return self.history

    # --------------------------------------------------------------------- start-up check

    def check(self) -> None:
        """Before training: a valid `user/name` repo id, a token, and a reachable Hub where the
        repository exists or can be created. Raises HubError with one line otherwise."""
        try:
            validate_repo_id(self.repo_id)
            well_formed = self.repo_id.count("/") == 1
        except HFValidationError:
            well_formed = False
        if not well_formed:
            raise HubError(f"Hub repo id {self.repo_id!r} is not valid; give it as user/name or organisation/name "
                           "(letters, digits, '-', '_', '.')")
        try:
            token = self._token or huggingface_hub.get_token()
        except Exception as error:  # noqa: BLE001 - get_token raises when an opted-in OIDC exchange fails
            raise HubError(f"cannot get a Hugging Face token ({self._scrub(describe(error))}); "
                           "set HF_TOKEN or run `hf auth login`") from None
        if not token:
            raise HubError("no Hugging Face token to push with; set HF_TOKEN or run `hf auth login`")
        self._known_token = token
        error = self._call_with_timeout(self._whoami_and_create_repo)
        if error is not None:
            raise HubError(self._explain_check_error(error)) from None

    def _whoami_and_create_repo(self) -> None:
        self.api.whoami()
        self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")

    def _call_with_timeout(self, function: Callable[[], None]) -> Optional[BaseException]:
        """Run `function` in a daemon thread; the exception it raised, a TimeoutError when it did
        not finish within check_timeout_s, or None. Programming errors are re-raised here."""
        outcome: dict[str, BaseException] = {}

        def target() -> None:
            try:
                function()
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = error

        thread = threading.Thread(target=target, name="hnmix-hub-check", daemon=True)
        thread.start()
        thread.join(self.check_timeout_s)
        if thread.is_alive():
            return TimeoutError(f"no answer within {self.check_timeout_s:g} s")
        error = outcome.get("error")
        if error is not None and not isinstance(error, network_error_types()):
            raise error
        return error

    def _explain_check_error(self, error: BaseException) -> str:
        where = f"the Hugging Face Hub ({self.repo_id})"
        if isinstance(error, OfflineModeIsEnabled):
            return f"cannot reach {where}: HF_HUB_OFFLINE is set; unset it, or train without pushing to the Hub"
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, HfHubHTTPError) and status == 401:
            return "the Hugging Face token is invalid or expired; set a valid HF_TOKEN or run `hf auth login --force`"
        if isinstance(error, HfHubHTTPError) and status == 403:
            return (f"the Hugging Face token may not create or write {self.repo_id}; use a token with write access "
                    "to that namespace, or another repo id")
        return (f"cannot reach {where}: {self._scrub(describe(error))}; check the network or proxy, "
                "or train without pushing to the Hub")

    # --------------------------------------------------------------------- strategies

    def on_save(self, step: int, *, encoder_dir: str | Path, checkpoint_dir: Optional[str | Path] = None) -> bool:
        """At a checkpoint: push per the strategy (nothing for `end`). Returns whether it queued."""
        if self.strategy == "end":
            return False
        return self._push_training_state(step, encoder_dir, checkpoint_dir, "checkpoint")

    def on_train_end(self, step: int, *, encoder_dir: str | Path, checkpoint_dir: Optional[str | Path] = None) -> bool:
        """At the end of training: push the encoder (and, for `checkpoint`, the final state)."""
        return self._push_training_state(step, encoder_dir, checkpoint_dir, "end of training")

    def _push_training_state(self, step: int, encoder_dir: str | Path, checkpoint_dir: Optional[str | Path],
                             when: str) -> bool:
        parts = [(Path(encoder_dir), "", False)]  # exported in place later: copy, never hard-link
        delete_patterns = None
        if self.strategy == "checkpoint" and checkpoint_dir is not None:
            # Complete checkpoints are never rewritten in place (renamed into place, removed whole),
            # so hard links are safe; stale files of an older state are deleted in the same commit.
            parts.append((Path(checkpoint_dir), LAST_CHECKPOINT, True))
            delete_patterns = [f"{LAST_CHECKPOINT}/*"]
        what = "encoder and training state" if len(parts) > 1 else "encoder"
        return self._enqueue(parts, path_in_repo="", commit_message=f"hnmix: {what} at step {step} ({when})",
                             delete_patterns=delete_patterns)

    # --------------------------------------------------------------------- pushing

    def push(self, folder: str | Path, *, path_in_repo: str = "", commit_message: str) -> None:
        """Queue an upload of `folder` to `path_in_repo`; returns once a snapshot is taken."""
        self._enqueue([(Path(folder), "", False)], path_in_repo=path_in_repo, commit_message=commit_message)

    def _enqueue(self, parts: list[tuple[Path, str, bool]], *, path_in_repo: str, commit_message: str,
                 delete_patterns: Optional[list[str]] = None) -> bool:
        for source, _, _ in parts:
            if not source.is_dir():
                raise NotADirectoryError(f"cannot push {source}: not a directory")
        result = UploadResult(folder=" + ".join(str(source) for source, _, _ in parts),
                              path_in_repo=path_in_repo, commit_message=commit_message)
        self.history.append(result)
        try:
            snapshot = self._snapshot(parts)
        except OSError as error:
            result.status, result.error = "failed", self._scrub(describe(error))
            logger.error(f"Hub push {commit_message!r} not queued: cannot snapshot {result.folder}: {result.error}")
            return False
        upload = _Upload(snapshot=snapshot, result=result, delete_patterns=delete_patterns)
        with self._changed:
            replaced, self._pending = self._pending, upload
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="hnmix-hub-push", daemon=True)
                self._worker.start()
        if replaced is not None:
            replaced.result.status = "skipped"
            replaced.result.error = f"replaced by the newer push {commit_message!r} before it started"
            shutil.rmtree(replaced.snapshot, ignore_errors=True)
            logger.info(f"Hub push {replaced.result.commit_message!r} skipped: replaced by {commit_message!r} "
                        "while an upload was in flight")
        return True

    def _snapshot(self, parts: list[tuple[Path, str, bool]]) -> Path:
        if self.staging_dir is not None:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
        snapshot = Path(tempfile.mkdtemp(prefix="hnmix-hub-", dir=self.staging_dir))
        try:
            for source, subfolder, hard_link in parts:
                copy = _link_or_copy if hard_link else shutil.copy2
                shutil.copytree(source, snapshot / subfolder, copy_function=copy, dirs_exist_ok=True)
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        return snapshot

    def _work(self) -> None:
        while True:
            with self._changed:
                upload, self._pending = self._pending, None
                self._in_flight = upload
                if upload is None:
                    self._worker = None
                    self._changed.notify_all()
                    return
            try:
                self._upload(upload)
            finally:
                shutil.rmtree(upload.snapshot, ignore_errors=True)

    def _upload(self, upload: _Upload) -> None:
        result = upload.result
        for attempt in range(self.max_attempts):
            result.attempts = attempt + 1
            try:
                extra = {"delete_patterns": upload.delete_patterns} if upload.delete_patterns else {}
                info = self.api.upload_folder(repo_id=self.repo_id, folder_path=str(upload.snapshot),
                                              path_in_repo=result.path_in_repo, commit_message=result.commit_message,
                                              repo_type="model", **extra)
            except Exception as error:  # noqa: BLE001 - an upload must never stop training
                result.error = self._scrub(describe(error))
                if attempt + 1 == self.max_attempts or _is_permanent(error):
                    result.status = "failed"
                    logger.error(f"Hub upload {result.commit_message!r} to {self.repo_id} failed after "
                                 f"{result.attempts} attempt(s): {result.error}")
                    return
                delay = self.backoff_s * 2 ** attempt
                logger.warning(f"Hub upload {result.commit_message!r}: attempt {result.attempts}/{self.max_attempts} "
                               f"failed ({result.error}); retrying in {delay:g} s")
                time.sleep(delay)
            else:
                result.status, result.error = "pushed", None
                result.commit = getattr(info, "commit_url", None) or getattr(info, "oid", None) or None
                logger.info(f"Pushed {result.commit_message!r} to https://huggingface.co/{self.repo_id}"
                            + (f" ({result.commit})" if result.commit else ""))
                return

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until no upload is in flight or pending (or `timeout` s passed) and log the outcome
        (each failure once). True when every push requested so far, skipped ones aside, succeeded."""
        with self._changed:
            idle = self._changed.wait_for(lambda: self._worker is None and self._pending is None, timeout)
        uploads = [result for result in self.history if result.status != "skipped"]
        failed = [result for result in uploads if result.status == "failed"]
        pushed = [result for result in uploads if result.ok]
        if not idle:
            logger.warning(f"Hub uploads to {self.repo_id} still running after {timeout:g} s; not waiting longer")
        for result in failed:
            if id(result) not in self._failures_reported:
                self._failures_reported.add(id(result))
                logger.error(f"Hub upload {result.commit_message!r} failed after {result.attempts} attempt(s): "
                             f"{result.error}")
        if pushed:
            last = pushed[-1]
            logger.info(f"Pushed {len(pushed)} upload(s) to https://huggingface.co/{self.repo_id}, last commit "
                        f"{last.commit or last.commit_message!r}")
        return idle and not failed

    # --------------------------------------------------------------------- helpers

    def _scrub(self, text: str) -> str:
        """`text` without the token (and without anything shaped like a Hugging Face token)."""
        if self._known_token:
            text = text.replace(self._known_token, "***")
        return _TOKEN_PATTERN.sub("hf_***", text)


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, destination)
    return destination


def _token_or_none() -> Optional[str]:
    try:
        return huggingface_hub.get_token()
    except Exception:  # noqa: BLE001 - only used to scrub logs; check() reports token problems
        return None


def _is_permanent(error: BaseException) -> bool:
    """HTTP 4xx answers other than timeouts and rate limits: retrying cannot help."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and status is not None and 400 <= status < 500 and status not in (408, 429)


