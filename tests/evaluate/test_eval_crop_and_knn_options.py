"""`python -m hnmix.evaluate` crops as the encoder was evaluated in training (the run's
--eval_crop_pct, else the export's pretrained_cfg crop_pct; `--eval_crop_pct` overrides both) and
runs the kNN of a recipe's monitor (`--knn_split`, `--knn_features projection`).

The data make the crop visible: CIFAR-layout 32 x 32 images, one grey for all, whose class is
only a 1-pixel frame (black or white). Uncropped, the frame tells the classes apart and the kNN
is right on every query; the ImageNet crop (resize to 37, keep the central 32) cuts the frame
off, every image looks the same and the kNN can do no better than the share of one class (50%).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from hnmix.backbones import create_backbone
from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD
from hnmix.evaluate.cli import main
from hnmix.hub.export import export_encoder
from hnmix.moco import MoCoEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FRAMES = {0: 0, 1: 255}  # class -> the frame's grey level


def framed(label: int) -> Image.Image:
    """A 32 x 32 grey image whose outermost pixels are black (class 0) or white (class 1)."""
    pixels = np.full((32, 32, 3), FRAMES[label], np.uint8)
    pixels[1:-1, 1:-1] = 128
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def framed_cifar(tmp_path_factory) -> Path:
    """plain_text/{train,test}-00000-of-00001.parquet with columns `img` and `label`, as
    uoft-cs/cifar10 (tests/data_images.py `write_cifar10_like_repo`): 8 training, 4 test images."""
    root = tmp_path_factory.mktemp("framed_cifar")
    (root / "plain_text").mkdir()
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["black", "white"])})
    for split, count in {"train": 8, "test": 4}.items():
        labels = [i % 2 for i in range(count)]
        dataset = datasets.Dataset.from_dict({"img": [framed(y) for y in labels], "label": labels}, features=features)
        dataset.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root


def cifar_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet18", stem="cifar").eval()


@pytest.fixture(scope="module")
def cifar_export(tmp_path_factory) -> Path:
    """A CIFAR-like export at 32 px, evaluated without a crop in training (crop_pct 1), with
    CIFAR-10 normalisation, and no run config beside it: its config.json is all there is."""
    return export_encoder(cifar_backbone(), tmp_path_factory.mktemp("export") / "encoder", img_size=32,
                          mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)


def evaluate(model: Path | str, data: Path, tmp_path: Path, *flags: str) -> dict:
    json_path = tmp_path / "report.json"
    json_path.unlink(missing_ok=True)
    code = main([str(model), "--dataset", str(data), "--image_column", "img", "--knn_split", "test", "--knn_k", "2",
                 "--batch_size", "4", "--num_workers", "0", "--json", str(json_path), *flags])
    assert code == 0
    return json.loads(json_path.read_text())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("hnmix: error: ")]
    return line


def test_an_export_is_evaluated_with_its_crop_and_eval_crop_pct_overrides_it(cifar_export, framed_cifar, tmp_path):
    report = evaluate(cifar_export, framed_cifar, tmp_path)
    assert report["settings"]["eval_crop_pct"] == 1.0 and report["knn_top1"] == 100.0  # the frame is seen
    assert report["settings"]["normalize_mean"] == list(CIFAR10_MEAN)  # and the export's normalisation used
    cropped = evaluate(cifar_export, framed_cifar, tmp_path, "--eval_crop_pct", "0.875")
    assert cropped["settings"]["eval_crop_pct"] == 0.875 and cropped["knn_top1"] == 50.0  # the frame is cut off


def test_the_run_config_beside_an_export_gives_the_crop_of_an_export_without_it(framed_cifar, tmp_path):
    # An export from before the crop was recorded says 0.875; DIR_OUT/config.yaml says what the run did.
    encoder = export_encoder(cifar_backbone(), tmp_path / "encoder", img_size=32)
    assert json.loads((encoder / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 0.875
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"arch": "resnet18", "stem": "cifar", "img_size": 32,
                                                          "dataset": str(framed_cifar), "eval_crop_pct": 1.0}))
    report = evaluate(encoder, framed_cifar, tmp_path)
    assert report["settings"]["eval_crop_pct"] == 1.0 and report["knn_top1"] == 100.0


def write_checkpoint(directory: Path, data: Path, **options) -> Path:
    """A trainer checkpoint's files: the query encoder under `encoder_q.` and config.yaml."""
    torch.manual_seed(0)
    encoder = MoCoEncoder("resnet18", 16, stem="cifar", head="linear")
    directory.mkdir(parents=True)
    save_file({f"encoder_q.{k}": v.contiguous() for k, v in encoder.state_dict().items()},
              str(directory / "model.safetensors"))
    config = {"arch": "resnet18", "stem": "cifar", "head": "linear", "dim_moco": 16, "img_size": 32,
              "dataset": str(data), "split": "train", "image_column": "img", "normalize": "cifar10"} | options
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def test_a_checkpoint_is_evaluated_with_its_runs_crop_and_knn_split(framed_cifar, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000001", framed_cifar, eval_crop_pct=1.0, knn_split="test")
    json_path = tmp_path / "defaults.json"
    assert main([str(checkpoint), "--knn_k", "2", "--num_workers", "0", "--json", str(json_path)]) == 0
    report = json.loads(json_path.read_text())
    assert report["settings"]["eval_crop_pct"] == 1.0 and report["knn_top1"] == 100.0
    assert report["settings"]["knn_split"] == "test" and report["dataset"]["sizes"] == {"train": 8, "held_out": 4}


def test_knn_features_projection_compares_the_checkpoints_head_output(framed_cifar, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000001", framed_cifar, eval_crop_pct=1.0)
    report = evaluate(checkpoint, framed_cifar, tmp_path, "--knn_features", "projection")
    assert report["settings"]["knn_features"] == "projection" and report["settings"]["knn_split"] == "test"
    assert report["dataset"]["held_out"] == f"{framed_cifar} split test" and report["knn_top1"] == 100.0


@pytest.mark.parametrize("flags, message", [
    (["--eval_crop_pct", "0"], "hnmix: error: option eval_crop_pct must be in (0, 1] (1: no crop), got 0.0"),
    (["--eval_crop_pct", "1.5"], "hnmix: error: option eval_crop_pct must be in (0, 1] (1: no crop), got 1.5"),
    (["--knn_features", "projection"], "hnmix: error: --knn_features projection needs the projection head, which "
                                       "only a trainer checkpoint holds"),
    (["--protocol", "linear"], "hnmix: error: options knn_split and knn_features belong to --protocol knn"),
])
def test_bad_options_are_one_line(cifar_export, framed_cifar, tmp_path, capsys, flags, message):
    code = main([str(cifar_export), "--dataset", str(framed_cifar), "--image_column", "img", "--knn_split", "test",
                 "--num_workers", "0", "--json", str(tmp_path / "r.json"), *flags])
    assert code == 2 and one_error_line(capsys).startswith(message)
