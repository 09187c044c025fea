"""`HubPusher`: uploads from the main process in one background thread, so training never waits
on the network. The way the trainer uses it:

    pusher = HubPusher(repo_id, strategy="every_save")
    pusher.check()                                   # before training: HubError, one line
    ...                                              # at each checkpoint (main process):
    write_model_card(encoder_dir, config=config.options(), results=..., repo_id=repo_id)
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

Why a thread of our own and not huggingface_hub's `upload_folder(run_as_future=True)`: that runs
in `HfApi.run_as_future`'s one-worker `ThreadPoolExecutor`, whose worker the interpreter joins at
exit, after running every queued call. `HfApi` calls have no timeout, so a run that gave up
waiting (the end-of-run wait, elastic's deadline on a stop) would still hang at exit until the
upload ended or the launcher's SIGKILL came, losing the stop's exit code 75. A daemon thread lets
the process go. The library's per-request retries (`http_backoff`: network errors, 408, 429,
5xx) do not retry a whole upload, hence `max_attempts`; `CommitScheduler` pushes a live folder
on a timer, with neither snapshots nor a replaceable waiting push.

Logging goes through `logging.getLogger(__name__)`, not accelerate's logger: the pusher logs from
its worker thread, where accelerate's main-process filter needs an initialised state (tests have none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError

from hnmix.errors import HubError, describe
from hnmix.hub.access import check_hub_access, scrub_token, token_or_none

logger = logging.getLogger(__name__)


STRATEGIES = ("end", "every_save", "checkpoint")
LAST_CHECKPOINT = "last-checkpoint"


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
        self._known_token = self._token or token_or_none()  # only to scrub it from what we log
        self.api = api if api is not None else huggingface_hub.HfApi(token=self._token)
        self.history: list[UploadResult] = []
        self._changed = threading.Condition()
        self._pending: Optional[tuple[Path, UploadResult, dict]] = None  # snapshot, result, upload_folder extras
        self._worker: Optional[threading.Thread] = None
        self._failures_reported: set[int] = set()  # id() of the failed results wait() has logged

    def check(self) -> None:
        """Before training: a valid repo id, a token, and a reachable Hub where the repository
        exists or can be created (`hnmix.hub.access.check_hub_access`). HubError, one line."""
        self._known_token = check_hub_access(self.api, self.repo_id, private=self.private, token=self._token,
                                             timeout_s=self.check_timeout_s, scrub=self._scrub)

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
        extra = {"delete_patterns": delete_patterns} if delete_patterns else {}
        with self._changed:
            replaced, self._pending = self._pending, (snapshot, result, extra)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="hnmix-hub-push", daemon=True)
                self._worker.start()
        if replaced is not None:
            old_snapshot, old, _ = replaced
            old.status, old.error = "skipped", f"replaced by the newer push {commit_message!r} before it started"
            shutil.rmtree(old_snapshot, ignore_errors=True)
            logger.info(f"Hub push {old.commit_message!r} skipped: replaced by {commit_message!r} "
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
                if upload is None:
                    self._worker = None
                    self._changed.notify_all()
                    return
            try:
                self._upload(*upload)
            finally:
                shutil.rmtree(upload[0], ignore_errors=True)

    def _upload(self, snapshot: Path, result: UploadResult, extra: dict) -> None:
        for attempt in range(self.max_attempts):
            result.attempts = attempt + 1
            try:
                info = self.api.upload_folder(repo_id=self.repo_id, folder_path=str(snapshot),
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

    def _scrub(self, text: str) -> str:
        return scrub_token(text, self._known_token)


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, destination)
    return destination


def _is_permanent(error: BaseException) -> bool:
    """HTTP 4xx answers other than timeouts and rate limits: retrying cannot help."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and status is not None and 400 <= status < 500 and status not in (408, 429)
