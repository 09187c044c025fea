"""The export records the run's evaluation crop (--eval_crop_pct) as timm's `crop_pct`, beside its
normalisation, and the model card says so: a CIFAR-like encoder (32 px, crop_pct 1, MoCo's
CIFAR-10 demo's test transform) is used by timm without a crop."""

import json

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

import hnmix
from hnmix.backbones import create_backbone
from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD
from hnmix.hub.export import export_encoder
from hnmix.train.components import build_model, publish_encoder
from hnmix.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pretrained_cfg(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["pretrained_cfg"]


@pytest.mark.parametrize("options, crop_pct, mean, card_says", [
    ({"eval_crop_pct": 1.0, "normalize": "cifar10"}, 1.0, CIFAR10_MEAN,
     "resize the short side to 32, centre crop 32 (no crop of a 32 x 32 image), CIFAR-10 mean and std"),
    ({}, 224 / 256, (0.485, 0.456, 0.406), "resize to 37, centre crop 32 (crop_pct 0.875), ImageNet mean and std"),
])
def test_the_trainers_export_records_the_runs_eval_crop_pct(tmp_path, options, crop_pct, mean, card_says):
    config = TrainConfig.from_options(dataset="synthetic", arch="test_resnet", img_size=32, batch_size=8, dim_moco=16, k_moco=16,
                         n_hard=4, s1_hard=2, s2_hard=2, dir_out=str(tmp_path), **options)
    encoder_dir = publish_encoder(config, build_model(config.model, config.method, (0, 0), seed=config.run.seed), {}, steps_trained=0)
    cfg = pretrained_cfg(encoder_dir)
    assert cfg["crop_pct"] == crop_pct and tuple(cfg["mean"]) == mean
    assert f"The preprocessing ({card_says}) is recorded in `config.json`" in ModelCard.load(encoder_dir / "README.md").text


def test_a_cifar_like_export_with_crop_pct_1_is_used_by_timm_without_a_crop(tmp_path):
    torch.manual_seed(0)
    directory = export_encoder(create_backbone("resnet18", stem="cifar").eval(), tmp_path / "encoder", img_size=32,
                               mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)
    encoder = hnmix.load_encoder(directory)
    data_config = timm.data.resolve_model_data_config(encoder)
    assert (data_config["crop_pct"], tuple(data_config["input_size"])) == (1.0, (3, 32, 32))
    transform = timm.data.create_transform(**data_config, is_training=False)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    # The demo's test transform: ToTensor, Normalize with CIFAR-10's statistics; nothing resized or cut.
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(transform(Image.fromarray(pixels)), expected.float(), rtol=0, atol=1e-5)
