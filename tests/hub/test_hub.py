"""hnmix.hub: the model card, background pushes (snapshot, one in flight, retries, no token
anywhere), the start-up check, and the exported encoder loading back through a (fake) Hub.

The Hub cannot be reached from the test machines: `FakeHubApi` stands in for `HfApi` and only
for it; everything else (ModelCard, timm, the snapshot files) is real.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from fake_hub import FakeHubApi
from huggingface_hub import ModelCard
from PIL import Image

from hnmix.errors import HubError
from hnmix.hub.card import MODEL_CARD_TAGS, write_model_card
from hnmix.hub.export import export_encoder
from hnmix.hub.pusher import LAST_CHECKPOINT, HubPusher

TOKEN = "hf_SECRETTOKEN123"
REPO = "someone/mochi-test"
CONFIG = {
    "dataset": "ilee0022/Caltech-256", "split": "train", "arch": "resnet18", "img_size": 224, "steps": 25000,
    "stop_at": None, "batch_size": 64, "dim_moco": 128, "k_moco": 8192, "m_moco": 0.999, "t_moco": 0.07,
    "n_hard": 32, "s1_hard": 16, "s2_hard": 8, "start1_hard": 5000, "start2_hard": 10000,
    "dir_out": "/home/someone/secret-runs/out", "dir_data": "/home/someone/cache",
}
RESULTS = {"knn_top1": 41.25, "knn_top5": 63.5, "linear_top1": 48.75, "linear_top5": 71.0, "global_batch": 256}


def make_folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def pusher_with(api: FakeHubApi, tmp_path: Path, **options) -> HubPusher:
    options = {"token": TOKEN, "backoff_s": 0.01, "staging_dir": tmp_path / "staging"} | options
    return HubPusher(REPO, api=api, **options)


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


# ----------------------------------------------------------------------------- model card


def test_model_card_loads_back_with_metadata_parameters_results_and_loading_line(tmp_path):
    path = write_model_card(tmp_path, config=CONFIG, results=RESULTS, repo_id=REPO)
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert set(MODEL_CARD_TAGS) <= set(card.data.tags)
    assert {"image-feature-extraction", "timm", "self-supervised", "moco", "mochi", "hnmix"} <= set(card.data.tags)
    assert card.data.datasets == ["ilee0022/Caltech-256"]
    text = card.text
    for expected in ("resnet18", "k_moco", "8192", "n_hard", "s1_hard", "s2_hard", "start1_hard", "t_moco",
                     "NeurIPS 2020", "split `train`", "256", f'timm.create_model("hf-hub:{REPO}", pretrained=True',
                     "num_classes=0", "resolve_model_data_config", "create_transform"):
        assert expected in text, expected
    assert re.search(r"kNN.*\| 41\.25 \| 63\.50 \|", text)
    assert re.search(r"linear probe \| 48\.75 \| 71\.00 \|", text)


def test_model_card_omits_evaluation_when_there_are_no_results(tmp_path):
    text = ModelCard.load(write_model_card(tmp_path, config=CONFIG, repo_id=REPO)).text
    assert "## Evaluation" not in text and "| kNN" not in text and "| linear probe" not in text and "top-1" not in text
    assert f"hf-hub:{REPO}" in text


def test_model_card_leaves_out_paths_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = write_model_card(tmp_path, config=CONFIG, results=RESULTS, repo_id=REPO)
    text = path.read_text()
    assert TOKEN not in text and "/home/someone" not in text and "secret-runs" not in text


@pytest.mark.parametrize("dataset", ["synthetic", "LOCAL_DIR", "./data/images", "/data/caltech"])
def test_model_card_names_no_hub_dataset_for_synthetic_or_local_data(tmp_path, dataset):
    if dataset == "LOCAL_DIR":
        dataset = str(make_folder(tmp_path / "local_images", {"a/x.txt": "x"}))
    card = ModelCard.load(write_model_card(tmp_path, config=CONFIG | {"dataset": dataset}))
    assert card.data.datasets is None
    assert "datasets" not in card.data.to_dict()
    assert "hf-hub:USER/MODEL" in card.text  # no repo id: a placeholder, not a local path


# ----------------------------------------------------------------------------- pushing


def test_push_uploads_the_folder_with_its_path_in_repo_and_commit_message(tmp_path):
    folder = make_folder(tmp_path / "encoder", {"config.json": "{}", "model.safetensors": "weights", "sub/a.txt": "a"})
    api = FakeHubApi()
    pusher = pusher_with(api, tmp_path)
    pusher.push(folder, path_in_repo="runs/1", commit_message="first")
    assert pusher.wait(timeout=10)
    [upload] = api.uploads
    assert upload["repo_id"] == REPO and upload["repo_type"] == "model"
    assert upload["path_in_repo"] == "runs/1" and upload["commit_message"] == "first"
    assert upload["files"] == {"config.json": b"{}", "model.safetensors": b"weights", "sub/a.txt": b"a"}
    [result] = pusher.history
    assert (result.ok, result.attempts, result.error, result.path_in_repo) == (True, 1, None, "runs/1")
    assert result.folder == str(folder) and result.commit.startswith(f"https://huggingface.co/{REPO}/commit/")
    assert folder.exists() and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "sub"]
    assert list((tmp_path / "staging").iterdir()) == []  # snapshots cleaned up


def test_push_returns_while_the_upload_is_in_flight(tmp_path):
    folder = make_folder(tmp_path / "encoder", {"a.txt": "a"})
    api = FakeHubApi(hold=True)
    pusher = pusher_with(api, tmp_path)
    started = time.perf_counter()
    pusher.push(folder, commit_message="background")
    assert time.perf_counter() - started < 5
    assert api.started.wait(5)  # the upload runs, in another thread, and has not finished
    assert pusher.wait(timeout=0.05) is False
    assert api.uploads == []
    api.release.set()
    assert pusher.wait(timeout=10) is True
    assert [u["commit_message"] for u in api.uploads] == ["background"]


def test_pushes_during_an_upload_keep_only_the_newest_pending_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hnmix.hub")
    folders = [make_folder(tmp_path / f"f{i}", {"step.txt": str(i)}) for i in range(3)]
    api = FakeHubApi(hold=True)
    pusher = pusher_with(api, tmp_path)
    pusher.push(folders[0], commit_message="step 0")
    assert api.started.wait(5)
    pusher.push(folders[1], commit_message="step 1")
    pusher.push(folders[2], commit_message="step 2")
    api.release.set()
    assert pusher.wait(timeout=10)
    assert [u["commit_message"] for u in api.uploads] == ["step 0", "step 2"]
    assert api.uploads[1]["files"] == {"step.txt": b"2"}
    assert [(r.commit_message, r.status) for r in pusher.history] == [
        ("step 0", "pushed"), ("step 1", "skipped"), ("step 2", "pushed")]
    assert any("'step 1' skipped" in m and "'step 2'" in m for m in messages(caplog))
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_failing_upload_is_retried_with_backoff_until_it_succeeds(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hnmix.hub")
    api = FakeHubApi(fail_times=2)
    pusher = pusher_with(api, tmp_path, max_attempts=4)
    pusher.push(make_folder(tmp_path / "encoder", {"a.txt": "a"}), commit_message="retry me")
    assert pusher.wait(timeout=10)
    [result] = pusher.history
    assert (result.ok, result.attempts, result.error) == (True, 3, None)
    assert len(api.uploads) == 3
    retries = [m for m in messages(caplog) if "retrying in" in m]
    assert len(retries) == 2 and "retrying in 0.01 s" in retries[0] and "retrying in 0.02 s" in retries[1]


def test_an_upload_that_always_fails_is_logged_and_never_raises(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hnmix.hub")
    folder = make_folder(tmp_path / "encoder", {"a.txt": "a"})
    api = FakeHubApi(fail_times=100)
    pusher = pusher_with(api, tmp_path, max_attempts=3)
    pusher.push(folder, commit_message="doomed")
    assert pusher.wait(timeout=10) is False
    [result] = pusher.history
    assert (result.ok, result.status, result.attempts) == (False, "failed", 3)
    assert "ConnectionError: connection reset by peer" in result.error
    assert len(api.uploads) == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("'doomed'" in m and "failed after 3 attempt(s)" in m for m in errors)
    assert (folder / "a.txt").read_text() == "a"  # local files untouched


def test_the_token_appears_in_no_log_error_text_snapshot_or_card(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = tmp_path / "encoder"
    folder.mkdir()
    write_model_card(folder, config=CONFIG, results=RESULTS, repo_id=REPO)
    make_folder(folder, {"config.json": "{}"})
    leaky = ConnectionError(f"request with 'Authorization: Bearer {TOKEN}' failed")
    api = FakeHubApi(fail_times=2, error=leaky)
    pusher = pusher_with(api, tmp_path, max_attempts=2)
    pusher.push(folder, commit_message="leak test")
    assert pusher.wait(timeout=10) is False
    pusher.push(folder, commit_message="leak test again")
    assert pusher.wait(timeout=10) is False  # the first push failed; wait() answers for all pushes
    assert [r.status for r in pusher.history] == ["failed", "pushed"]
    assert caplog.records
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    for result in pusher.history:
        assert TOKEN not in repr(result)
    for upload in api.uploads:
        for content in upload["files"].values():
            assert TOKEN.encode() not in content
    assert TOKEN not in (folder / "README.md").read_text()


def test_a_run_that_stopped_waiting_exits_with_an_upload_still_hanging(tmp_path):
    """huggingface_hub's run_as_future pool is joined at interpreter exit; the pusher's daemon
    thread is not, so a bounded wait (the end of a run, elastic's deadline) bounds the exit too."""
    script = f"""
import sys, threading
from fake_hub import FakeHubApi
from hnmix.hub.pusher import HubPusher
api = FakeHubApi()
api.upload_folder = lambda **kw: threading.Event().wait()  # a Hub that never answers
pusher = HubPusher({REPO!r}, token={TOKEN!r}, api=api, staging_dir={str(tmp_path / "staging")!r})
pusher.push({str(make_folder(tmp_path / "encoder", {"a.txt": "a"}))!r}, commit_message="hangs")
sys.exit(75 if pusher.wait(timeout=0.1) is False else 1)
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"})
    assert result.returncode == 75, result.stderr[-2000:]


def test_the_snapshot_is_taken_before_push_returns(tmp_path):
    folder = make_folder(tmp_path / "encoder", {"model.safetensors": "old weights", "config.json": "{}"})
    api = FakeHubApi(hold=True)
    pusher = pusher_with(api, tmp_path)
    pusher.push(folder, commit_message="consistent")
    (folder / "model.safetensors").write_text("new weights, written in place")
    (folder / "config.json").unlink()
    (folder / "extra.txt").write_text("added later")
    api.release.set()
    assert pusher.wait(timeout=10)
    assert api.uploads[0]["files"] == {"model.safetensors": b"old weights", "config.json": b"{}"}
    shutil.rmtree(folder)  # and a folder pruned while pending still uploads what it held
    folder = make_folder(tmp_path / "pruned", {"a.txt": "a"})
    api.release.clear()
    pusher.push(folder, commit_message="pruned")
    shutil.rmtree(folder)
    api.release.set()
    assert pusher.wait(timeout=10)
    assert api.uploads[1]["files"] == {"a.txt": b"a"}


def test_strategies_decide_what_each_save_pushes(tmp_path):
    encoder = make_folder(tmp_path / "encoder", {"config.json": "{}", "model.safetensors": "w", "README.md": "card"})
    checkpoint = make_folder(tmp_path / "step_00000010",
                             {"model.safetensors": "state", "trainer_state.json": '{"step": 10}'})
    end_api, save_api, checkpoint_api = FakeHubApi(), FakeHubApi(), FakeHubApi()
    end = pusher_with(end_api, tmp_path, strategy="end")
    every_save = pusher_with(save_api, tmp_path, strategy="every_save")
    full = pusher_with(checkpoint_api, tmp_path, strategy="checkpoint")
    for pusher in (end, every_save, full):
        pusher.on_save(10, encoder_dir=encoder, checkpoint_dir=checkpoint)
        assert pusher.wait(timeout=10)
    assert end_api.uploads == []
    assert set(save_api.uploads[0]["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert "step 10" in save_api.uploads[0]["commit_message"]
    upload = checkpoint_api.uploads[0]
    assert set(upload["files"]) == {"config.json", "model.safetensors", "README.md",
                                    f"{LAST_CHECKPOINT}/model.safetensors", f"{LAST_CHECKPOINT}/trainer_state.json"}
    assert upload["path_in_repo"] == "" and upload["delete_patterns"] == [f"{LAST_CHECKPOINT}/*"]
    end.on_train_end(20, encoder_dir=encoder)
    assert end.wait(timeout=10)
    assert "end of training" in end_api.uploads[0]["commit_message"]
    assert (checkpoint / "model.safetensors").read_text() == "state"  # hard links left the source as it was


def test_an_unknown_strategy_is_a_hub_error():
    with pytest.raises(HubError, match="strategy"):
        HubPusher(REPO, strategy="sometimes", api=FakeHubApi())


# ----------------------------------------------------------------------------- start-up check


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text and TOKEN not in text
    return text


def test_check_passes_and_creates_the_repository(tmp_path):
    api = FakeHubApi()
    pusher_with(api, tmp_path, private=True).check()
    assert api.created == [{"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"}]


def test_check_without_a_token_says_how_to_log_in(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError) as error:
        HubPusher(REPO, api=FakeHubApi()).check()
    text = assert_one_line(error)
    assert "HF_TOKEN" in text and "hf auth login" in text


def test_check_takes_the_token_from_the_login(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    asked = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: asked.append("login") or TOKEN)
    api = FakeHubApi()
    pusher = HubPusher(REPO, api=api)  # no token given, none in the environment
    asked.clear()
    pusher.check()
    assert asked == ["login"]  # the check asked the login for the token, and went on with it
    assert api.created == [{"repo_id": REPO, "private": False, "exist_ok": True, "repo_type": "model"}]


@pytest.mark.parametrize("repo_id", ["not a repo id", "a/b/c", "only-a-name", "user/na..me", ""])
def test_check_refuses_an_invalid_repo_id(repo_id):
    with pytest.raises(HubError) as error:
        HubPusher(repo_id, token=TOKEN, api=FakeHubApi()).check()
    assert "user/name" in assert_one_line(error)


def test_check_reports_an_unreachable_hub(tmp_path):
    api = FakeHubApi(whoami_error=ConnectionError(f"Max retries exceeded (token {TOKEN})\nsecond line"))
    with pytest.raises(HubError) as error:
        pusher_with(api, tmp_path).check()
    text = assert_one_line(error)
    assert "cannot reach" in text and REPO in text and "network" in text


def test_check_reports_an_invalid_token(tmp_path):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/whoami-v2"))
    api = FakeHubApi(whoami_error=HfHubHTTPError("401 Client Error: Unauthorized", response=response))
    with pytest.raises(HubError) as error:
        pusher_with(api, tmp_path).check()
    assert "invalid" in assert_one_line(error)


def test_check_gives_up_on_a_hub_that_never_answers(tmp_path):
    never = threading.Event()
    pusher = pusher_with(FakeHubApi(whoami_blocks=never), tmp_path, check_timeout_s=0.2)
    started = time.perf_counter()
    with pytest.raises(HubError) as error:
        pusher.check()
    never.set()
    assert time.perf_counter() - started < 5
    assert "no answer within 0.2 s" in assert_one_line(error)


def test_check_with_the_real_client_in_offline_mode(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as error:
        HubPusher(REPO, token=TOKEN).check()
    assert "HF_HUB_OFFLINE" in assert_one_line(error)


def test_check_with_the_real_client_and_a_refused_connection():
    with socket.socket() as probe:  # a local port nobody listens on: refused at once, no network used
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = huggingface_hub.HfApi(endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    with pytest.raises(HubError) as error:
        HubPusher(REPO, token=TOKEN, api=api).check()
    assert "cannot reach" in assert_one_line(error)


# ----------------------------------------------------------------------------- round trip


def test_the_exported_encoder_loads_back_from_the_pushed_repository(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0).eval()
    encoder_dir = export_encoder(backbone, tmp_path / "encoder", img_size=32)
    write_model_card(encoder_dir, config=CONFIG | {"arch": "test_resnet", "img_size": 32}, results=RESULTS,
                     repo_id=REPO)
    repo_dir = tmp_path / "hub" / REPO
    api = FakeHubApi(repo_dir=repo_dir)
    pusher = pusher_with(api, tmp_path, strategy="every_save")
    pusher.on_train_end(100, encoder_dir=encoder_dir)
    assert pusher.wait(timeout=30)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in repo_dir.iterdir()}

    loaded = timm.create_model(f"local-dir:{repo_dir}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = backbone(images), loaded(images)
    assert actual.shape == (2, backbone.num_features)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)

    # The card's usage example runs as written, with the Hub name pointing at the local copy.
    card_text = ModelCard.load(repo_dir / "README.md").text
    [example] = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    image_path = tmp_path / "image.jpg"
    Image.new("RGB", (48, 40), (120, 30, 200)).save(image_path)
    example = example.replace(f"hf-hub:{REPO}", f"local-dir:{repo_dir}").replace('"image.jpg"', repr(str(image_path)))
    namespace: dict = {}
    exec(compile(example, "model_card_example", "exec"), namespace)
    assert namespace["features"].shape == (1, backbone.num_features)


def test_the_exported_config_is_hnmixs_not_timms_imagenet_weights(tmp_path):
    import json

    backbone = timm.create_model("resnet18", num_classes=0)  # timm's cfg: tag a1_in1k, arXiv:2110.00476, apache-2.0
    export_encoder(backbone, tmp_path, img_size=96)
    cfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert cfg["tag"] == "hnmix" and cfg["paper_ids"] == "arXiv:2010.01028"
    for claim in ("license", "origin_url", "hf_hub_id", "url", "test_input_size", "pool_size"):
        assert claim not in cfg, claim
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ([3, 96, 96], 224 / 256, "bilinear")
    assert backbone.pretrained_cfg["tag"] == "a1_in1k"  # the training model is left as it was
