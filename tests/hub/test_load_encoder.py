"""hnmix.load_encoder: every export as a timm model (the CIFAR stem included, which stock timm
cannot rebuild), the stem recorded in config.json, the model card's loading line. Local folders
only; the Hub id path is exercised offline (its one-line error)."""

import json
import re

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

import hnmix
from hnmix.backbones import create_backbone
from hnmix.errors import ConfigError, HubError
from hnmix.hub.card import write_model_card
from hnmix.hub.export import export_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = "someone/cifar-test"
CONFIG = {"dataset": "uoft-cs/cifar10", "split": "train", "arch": "resnet18", "img_size": 32, "steps": 100,
          "batch_size": 8, "dim_moco": 128, "k_moco": 4096, "m_moco": 0.99, "t_moco": 0.1}


def trained_like(arch: str, stem: str) -> torch.nn.Module:
    """A backbone whose BatchNorm statistics are not the initial ones (so a load that kept them would show)."""
    torch.manual_seed(0)
    backbone = create_backbone(arch, stem=stem).train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32) * 3 + 1)
    return backbone.eval()


def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def cifar_export(tmp_path_factory):
    backbone = trained_like("resnet18", "cifar")
    directory = export_encoder(backbone, tmp_path_factory.mktemp("cifar") / "encoder", img_size=32)
    return backbone, directory


def test_the_export_records_the_stem_in_a_section_timm_ignores(cifar_export, tmp_path):
    _, directory = cifar_export
    config = json.loads((directory / "config.json").read_text())
    assert config["hnmix"] == {"stem": "cifar"}
    assert "pool_size" not in config["pretrained_cfg"]  # a 7x7 map at 224 is not this stem's
    plain = export_encoder(trained_like("test_resnet", "default"), tmp_path / "plain", img_size=32)
    assert json.loads((plain / "config.json").read_text())["hnmix"] == {"stem": "default"}


def test_stock_timm_cannot_rebuild_the_cifar_stem_and_load_encoder_does(cifar_export):
    backbone, directory = cifar_export
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        timm.create_model(f"local-dir:{directory}", pretrained=True)
    loaded = hnmix.load_encoder(directory)
    assert loaded.conv1.stride == (1, 1) and isinstance(loaded.maxpool, torch.nn.Identity)
    assert loaded.num_classes == 0 and tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32)  # older timm keeps config.json's list
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(features(loaded, images), features(backbone, images), rtol=0, atol=0)
    torch.testing.assert_close(features(hnmix.load_encoder(f"local-dir:{directory}"), images),
                               features(backbone, images), rtol=0, atol=0)
    assert hnmix.load_encoder(str(directory)).training  # as timm.create_model returns a model


def test_on_a_plain_export_load_encoder_is_timms_own_loading(tmp_path):
    directory = export_encoder(trained_like("test_resnet", "default"), tmp_path / "encoder", img_size=32)
    loaded, timms = hnmix.load_encoder(directory), timm.create_model(f"local-dir:{directory}", pretrained=True)
    assert type(loaded) is type(timms) and loaded.pretrained_cfg == timms.pretrained_cfg
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(loaded, images), features(timms, images), rtol=0, atol=0)


def test_an_export_from_before_the_stem_was_recorded_loads_as_a_plain_one(tmp_path):
    directory = export_encoder(trained_like("test_resnet", "default"), tmp_path / "encoder", img_size=32)
    config = json.loads((directory / "config.json").read_text())
    del config["hnmix"]
    (directory / "config.json").write_text(json.dumps(config))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(hnmix.load_encoder(directory), images),
                               features(timm.create_model(f"local-dir:{directory}", pretrained=True), images))


@pytest.mark.parametrize("what", ["missing", "no_export", "offline_hub"])
def test_what_a_user_gets_wrong_is_one_line(tmp_path, monkeypatch, what):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, error_type, message = {
        "missing": (str(tmp_path / "nowhere"), ConfigError, "does not exist; pass DIR_OUT/encoder"),
        "no_export": (str(tmp_path), ConfigError, "holds no config.json: it is no exported encoder"),
        "offline_hub": ("someone/no-such-encoder", HubError, "cannot load the Hub model someone/no-such-encoder"),
    }[what]
    with pytest.raises(error_type) as error:
        hnmix.load_encoder(source)
    assert "\n" not in str(error.value) and message in str(error.value)


# ----------------------------------------------------------------------------- the model card


def card_example(directory) -> str:
    [example] = re.findall(r"```python\n(.*?)```", ModelCard.load(directory / "README.md").text, flags=re.S)
    return example


def run_example(example: str, tmp_path) -> torch.Tensor:
    image_path = tmp_path / "image.jpg"
    Image.new("RGB", (40, 36), (120, 30, 200)).save(image_path)
    namespace: dict = {}
    exec(compile(example.replace('"image.jpg"', repr(str(image_path))), "model_card_example", "exec"), namespace)
    return namespace["features"]


def test_the_card_of_a_cifar_stem_encoder_loads_it_with_load_encoder(cifar_export, tmp_path):
    backbone, directory = cifar_export
    write_model_card(directory, config=CONFIG | {"stem": "cifar", "head": "linear"}, repo_id=REPO)
    text = ModelCard.load(directory / "README.md").text
    example = card_example(directory)
    assert f'model = hnmix.load_encoder("{REPO}").eval()' in example and "timm.create_model" not in example
    assert "| stem | CIFAR |" in text and "(`resnet18` with the CIFAR stem, timm)" in text
    assert f'`hnmix.load_encoder("{REPO}")` loads every encoder hnmix exports' in text
    # As written, with the Hub id pointing at the local folder.
    assert run_example(example.replace(f'"{REPO}"', repr(str(directory))), tmp_path).shape == (1, 512)


def test_the_card_of_a_plain_encoder_loads_it_with_timm_and_names_load_encoder_too(tmp_path):
    directory = export_encoder(trained_like("test_resnet", "default"), tmp_path / "encoder", img_size=32)
    write_model_card(directory, config=CONFIG | {"arch": "test_resnet", "stem": "default"}, repo_id=REPO)
    example = card_example(directory)
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True, num_classes=0)' in example
    assert "hnmix" not in example
    text = ModelCard.load(directory / "README.md").text
    assert "| stem |" not in text and f'`hnmix.load_encoder("{REPO}")` loads every encoder' in text
    assert run_example(example.replace(f"hf-hub:{REPO}", f"local-dir:{directory}"), tmp_path).ndim == 2
