"""hnmix.train with --push_to_hub: start-up checks, and what reaches the Hub (an injected client)."""

import os
import subprocess
import sys

import pytest
import timm
import torch
from fake_hub import FakeHubApi
from huggingface_hub import ModelCard
from tiny_run import TINY, checkpoints, metrics

import hnmix.hub.pusher
import hnmix.train.loop
from hnmix.train.config import parse_config
from hnmix.train.loop import train
from launch import REPO

TOKEN = "hf_SECRETtrainTOKEN42"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_train(*args, env):
    return subprocess.run([sys.executable, "-m", "hnmix.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONPATH": str(REPO)} | env)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"HF_TOKEN": "", "HF_HOME": "/nonexistent-hf-home"}, "token"),
        ({"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}, "Hub"),
    ],
)
def test_push_to_hub_fails_before_training_with_one_line(tmp_path, env, message):
    result = run_train(*TINY, "-s", "2", "-do", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/encoder",
                       env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("hnmix: error:") and message in last and "Traceback" not in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert not (tmp_path / "out/checkpoints").exists()


def test_a_run_pushes_encoder_card_and_last_checkpoint(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    fake = FakeHubApi(repo_dir=repo)
    monkeypatch.setattr(hnmix.hub.pusher.huggingface_hub, "HfApi", lambda token=None: fake)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    train(parse_config([*TINY, "-s", "4", "-sp", "2", "-ss", "2", "--num_workers", "0", "--eval_every", "0",
                        "-do", str(out), "--push_to_hub", "--hub_model_id", "me/encoder", "--hub_strategy", "checkpoint"]))

    assert all(u["repo_id"] == "me/encoder" for u in fake.uploads)
    steps = [u["commit_message"].split(" at step ")[1].split()[0] for u in fake.uploads]
    assert steps == ["2", "4"]  # every save, then the end
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in repo.iterdir()}
    assert (repo / "last-checkpoint/trainer_state.json").exists()
    assert '"step": 4' in (repo / "last-checkpoint/trainer_state.json").read_text()
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "timm" and "hf-hub:me/encoder" in card.text
    # The training curves travel with the encoder, and the card shows them.
    assert all("curves.png" in u["files"] for u in fake.uploads)
    assert (repo / "curves.png").read_bytes() == (out / "curves.png").read_bytes()
    assert "](curves.png)" in card.text

    pushed = timm.create_model(f"local-dir:{repo}", pretrained=True).eval()
    local = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pushed(x), local(x), rtol=0, atol=0)

    for path in [*out.rglob("*"), *repo.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_failed_upload_is_logged_and_training_carries_on_to_the_end(tmp_path, monkeypatch, capfd):
    """The Hub refuses every upload (HTTP 403, so no retries): the step-2 push fails while the run
    goes on, the push at the end is still made and fails too; the run ends with 0, all its records,
    its checkpoint and encoder, and the log names each failed upload."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/models/me/encoder/commit"))
    fake = FakeHubApi(fail_times=100, error=HfHubHTTPError("403 Forbidden: no write access", response=response))
    monkeypatch.setattr(hnmix.hub.pusher.huggingface_hub, "HfApi", lambda token=None: fake)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hnmix.train.loop, "refresh_curves", lambda dir_out: None)  # no pictures: CI time
    out = tmp_path / "out"
    assert train(parse_config([*TINY, "-s", "4", "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0",
                               "-do", str(out), "--push_to_hub", "--hub_model_id", "me/encoder",
                               "--hub_strategy", "every_save"])) == 0
    assert [u["commit_message"] for u in fake.uploads] == ["hnmix: encoder at step 2 (checkpoint)",
                                                           "hnmix: encoder at step 4 (end of training)"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert checkpoints(out) == ["step_00000002", "step_00000004"] and (out / "encoder/model.safetensors").exists()
    logged = " ".join(capfd.readouterr().err.split())
    for step, when in ((2, "checkpoint"), (4, "end of training")):
        assert f"Hub upload 'hnmix: encoder at step {step} ({when})' to me/encoder failed after 1 attempt(s)" in logged
