"""`FakeHubApi`: stands in for `huggingface_hub.HfApi` (the Hub cannot be reached from the test
machines) and records what it was asked."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace


class FakeHubApi:
    """Records what `HfApi` would have been asked. upload_folder: signals `started`, waits for
    `release` (set unless hold=True), reads the folder (names -> bytes), fails `fail_times`
    times with `error`, else copies the folder into `repo_dir/path_in_repo` (the repository)."""

    def __init__(self, *, fail_times: int = 0, error: Exception | None = None, hold: bool = False,
                 repo_dir: Path | None = None, whoami_error: Exception | None = None,
                 whoami_blocks: threading.Event | None = None):
        self.fail_times = fail_times
        self.error = error or ConnectionError("connection reset by peer")
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.repo_dir = repo_dir
        self.whoami_error = whoami_error
        self.whoami_blocks = whoami_blocks
        self.uploads: list[dict] = []
        self.created: list[dict] = []

    def whoami(self):
        if self.whoami_blocks is not None:
            self.whoami_blocks.wait(10)
        if self.whoami_error is not None:
            raise self.whoami_error
        return {"name": "someone"}

    def create_repo(self, repo_id, *, private, exist_ok, repo_type):
        self.created.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type})

    def upload_folder(self, *, repo_id, folder_path, path_in_repo, commit_message, repo_type, **extra):
        self.started.set()
        assert self.release.wait(10), "the test never released the upload"
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "folder_path": folder_path, "path_in_repo": path_in_repo,
                             "commit_message": commit_message, "repo_type": repo_type, "files": files, **extra})
        if self.fail_times > 0:
            self.fail_times -= 1
            raise self.error
        if self.repo_dir is not None:
            shutil.copytree(folder, self.repo_dir / path_in_repo, dirs_exist_ok=True)
        number = len(self.uploads)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{number:040x}", oid=f"{number:040x}")
