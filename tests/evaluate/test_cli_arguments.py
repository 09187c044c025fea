"""`python -m hnmix.evaluate`'s arguments: a missing local path is one line at once (never ~30 s of
Hub retries) while `owner/name` still goes to the Hub; `--eval_max_samples 0` means all, as in
hnmix.train."""

from __future__ import annotations

import json
import re

import pytest
from accelerate import Accelerator

from hnmix.errors import ConfigError, HubError
from hnmix.evaluate import models
from hnmix.evaluate.cli import main
from hnmix.evaluate.models import is_local_path, load_backbone
from hnmix.train.components import build_knn_monitor
from hnmix.train.config import TrainConfig

SMALL = ["test_resnet", "--dataset", "synthetic", "--synthetic_size", "30", "-i", "32", "--batch_size", "16",
         "--num_workers", "0", "--knn_k", "5"]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("hnmix: error: ")]
    assert err.rstrip().endswith(line)
    return line


@pytest.fixture
def hub_calls(monkeypatch, tmp_path) -> list[str]:
    """Run in tmp_path, which holds a folder `runs/`; record what would go to the Hub instead of going."""
    calls: list[str] = []

    def load_from_hub(repo_id: str, **_) -> None:
        calls.append(repo_id)
        raise HubError(f"cannot load the Hub model {repo_id} (recorded by the test)")

    monkeypatch.setattr(models, "_load_from_hub", load_from_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    return calls


@pytest.mark.parametrize("model", ["runs/does_not_exist", "runs/demo/encodr", "./runs/nope", "../elsewhere/run",
                                   "~/no-such-hnmix-run", "/no/such/run", "a/b/c", "a\\b", ".hidden"])
def test_a_missing_local_path_is_one_line_without_the_hub(hub_calls, model):
    with pytest.raises(ConfigError, match=f"^model path {re.escape(model)} does not exist") as raised:
        load_backbone(model)
    assert hub_calls == [] and "\n" not in str(raised.value)


def test_the_error_names_the_folder_that_exists_and_the_hub_spelling(hub_calls, capsys):
    assert main(["runs/does_not_exist", "--dataset", "synthetic"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "hnmix: error: model path runs/does_not_exist does not exist (runs exists); pass a checkpoint directory or an "
        "exported encoder folder, or hf-hub:runs/does_not_exist for the Hub model")
    with pytest.raises(ConfigError, match=r"^model path runs/demo/encodr does not exist \(runs/demo exists\); pass "
                                          r"a checkpoint directory or an exported encoder folder$"):
        load_backbone("runs/demo/encodr")  # two `/`: no Hub id
    assert hub_calls == []


@pytest.mark.parametrize("model", ["someone/no-such-model", "hf-hub:someone/no-such-model", "hf-hub:runs/demo"])
def test_owner_slash_name_still_goes_to_the_hub(hub_calls, model):
    with pytest.raises(HubError):
        load_backbone(model)
    assert hub_calls == [model.removeprefix("hf-hub:")]


def test_is_local_path_tells_paths_from_hub_ids(hub_calls):
    assert [is_local_path(m) for m in ("runs/x", "./x", "~/x", "/x", "x/y/z", "..")] == [True] * 6
    assert [is_local_path(m) for m in ("someone/model", "resnet50", "resnet50.a1_in1k")] == [False] * 3


def test_eval_max_samples_0_means_all_as_in_the_trainer(tmp_path, capsys):
    sizes = {}
    for value in (None, "0", "7"):
        json_path = tmp_path / f"{value}.json"
        code = main([*SMALL, "--json", str(json_path), *(["--eval_max_samples", value] if value else [])])
        assert code == 0, capsys.readouterr().err
        report = json.loads(json_path.read_text())
        sizes[value] = report["dataset"]["sizes"]
        assert report["settings"]["eval_max_samples"] == (7 if value == "7" else None)  # 0 is saved as "all"
    assert sizes["0"] == sizes[None] == {"train": 30, "held_out": 30}
    assert sizes["7"] == {"train": 7, "held_out": 7}

    assert main([*SMALL, "--eval_max_samples", "-1"]) == 2
    assert one_error_line(capsys.readouterr().err) == \
        "hnmix: error: option eval_max_samples must be >= 0 (0: all), got -1"


def test_the_trainers_eval_max_samples_0_means_all_too():
    config = TrainConfig.from_options(dataset="synthetic", synthetic_size=30, img_size=32, batch_size=8, num_workers=0,
                         eval_every=1, eval_max_samples=0)
    monitor = build_knn_monitor(config, Accelerator(cpu=True))
    assert (len(monitor.bank_loader.dataset), len(monitor.query_loader.dataset)) == (30, 30)
