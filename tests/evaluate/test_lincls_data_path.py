"""lincls reads its training images through the trainer's fast crop path: uint8 RandomResizedCrop
(scale 0.08-1) + flip views cut in the DataLoader workers (`hnmix.data.geometric.one_crop`, or the
pixels kept in memory), normalised per batch on the accelerator; the evaluation images go uint8 too.
The normalisation on the accelerator gives torchvision's numbers, and a run saved before this
change still resumes, saying that its views change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from hnmix.bench.train import write_jpeg_folder
from hnmix.data.augmentation import CIFAR10_MEAN, CIFAR10_STD
from hnmix.data.geometric import draw_one_crop
from hnmix.data.sources import load_image_dataset
from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.data.two_views import sample_rng
from hnmix.evaluate.cli import main
from hnmix.evaluate.features import EvalImages, normalize_uint8
from hnmix.evaluate.lincls import LINCLS_AUGMENTATION, AugmentedImages, make_lincls_loader

GIB = 2**30


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> datasets.Dataset:
    """12 JPEGs of Caltech-256-like sizes (200-500 x 160-400) in 3 class folders, as imagefolder."""
    return load_image_dataset(str(write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), count=12, classes=3)))


def first_batch(images: AugmentedImages, *, batch_size: int, num_workers: int, epoch: int = 0):
    loader = make_lincls_loader(images, batch_size=batch_size, num_workers=num_workers, seed=0)
    loader.sampler.set_epoch(epoch)
    return next(iter(loader)), list(loader.sampler)[:batch_size]


def test_the_lincls_loader_gives_uint8_crops_and_their_labels(jpegs):
    images = AugmentedImages(jpegs, image_column="image", label_column="label", img_size=32, seed=0)
    assert images.decoded is None  # 32 px views of images over 64 px: decoded (reduced) at every draw
    (batch, labels), order = first_batch(images, batch_size=5, num_workers=1, epoch=2)
    assert batch.dtype == torch.uint8 and batch.shape == (5, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [jpegs[i % 12]["label"] for i in order]
    assert len({view.float().mean().item() for view in batch}) == 5  # five different crops
    assert images.batch_bytes(5) == 5 * (3 * 32 * 32 + 8)  # what /dev/shm is sized for


def test_images_kept_in_memory_give_the_views_decoded_at_every_draw(jpegs):
    """At 224 px every Caltech-like image is under 448 px on its short side: kept decoded, and no crop
    could have come from a reduced decode, so the views are those of the per-image path."""
    columns = dict(image_column="image", label_column="label", img_size=224, seed=3)
    kept = AugmentedImages(jpegs, **columns, in_memory_bytes=GIB)
    every_draw = AugmentedImages(jpegs, **columns)
    assert kept.decoded is not None and every_draw.decoded is None
    for encoded_index in (0, 7, 12 + 5, 5 * 12 + 11):
        view, label = kept[encoded_index]
        assert view.dtype == torch.uint8 and view.shape == (3, 224, 224)
        assert torch.equal(view, every_draw[encoded_index][0]) and label == every_draw[encoded_index][1]


def test_the_training_view_is_torchvisions_random_resized_crop_and_flip_at_scale_0_08():
    """Each view is torchvision's resized_crop (antialiased bilinear) of the box drawn from the
    sample's stream (seed, epoch, index), flipped where drawn, within rounding (PNGs: no reduced
    decode); the boxes span torchvision's lincls scale 0.08-1, not MoCo v2's 0.2-1."""
    dataset = make_synthetic_dataset(8, seed=0, image_size=96)
    images = AugmentedImages(dataset, image_column="image", label_column="label", img_size=40, seed=5)
    areas, flips = [], []
    for epoch in range(25):
        for index in range(8):
            image = dataset[index]["image"]
            crop, flip = draw_one_crop(96, 96, sample_rng(5, epoch, index), LINCLS_AUGMENTATION)
            reference = torch.from_numpy(np.array(TF.resized_crop(image, *crop, [40, 40], antialias=True)))
            reference = reference.permute(2, 0, 1)
            view, label = images[epoch * 8 + index]
            assert label == dataset[index]["label"]
            difference = (view.int() - (reference.flip(-1) if flip else reference).int()).abs().float()
            assert difference.max() <= 2 and difference.mean() < 0.25  # rounding (torch's uint8 kernel vs PIL's)
            areas.append(crop.height * crop.width / 96**2)
            flips.append(flip)
    assert min(areas) < 0.2 and max(areas) > 0.8  # P(no area under 0.2 in 200 draws) < 1e-11
    assert 60 < sum(flips) < 140  # about half flipped


@pytest.mark.parametrize("mean, std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), (CIFAR10_MEAN, CIFAR10_STD)])
def test_normalising_on_the_accelerator_equals_torchvisions_normalize_of_the_same_crops(jpegs, mean, std):
    images = AugmentedImages(jpegs, image_column="image", label_column="label", img_size=48, seed=0,
                             mean=mean, std=std)
    (batch, _), _ = first_batch(images, batch_size=6, num_workers=0)
    assert images.normalization == (mean, std)
    normalised = normalize_uint8(batch, *images.normalization)
    per_image = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    expected = torch.stack([per_image(Image.fromarray(view.permute(1, 2, 0).numpy())) for view in batch])
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised, expected, rtol=0, atol=1e-6)


def test_uint8_evaluation_images_normalised_on_the_accelerator_equal_the_evaluation_transform(jpegs):
    columns = dict(image_column="image", label_column="label", img_size=40, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                   crop_pct=0.8)
    as_uint8, as_float = EvalImages(jpegs, **columns, as_uint8=True), EvalImages(jpegs, **columns)
    for index in (0, 5, 11):
        image, label = as_uint8[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 40, 40) and label == as_float[index][1]
        torch.testing.assert_close(normalize_uint8(image[None], *as_uint8.normalization)[0], as_float[index][0],
                                   rtol=0, atol=1e-6)


def test_an_unreadable_training_image_is_a_blank_uint8_view_labelled_unreadable(jpegs):
    cells = jpegs.cast_column("image", datasets.Image(decode=False)).to_dict()
    cells["image"][2] = {"bytes": b"not an image", "path": "broken.jpg"}
    broken = datasets.Dataset.from_dict(cells, features=jpegs.cast_column("image", datasets.Image(decode=False)).features)
    images = AugmentedImages(broken, image_column="image", label_column="label", img_size=32, seed=0)
    view, label = images[12 + 2]
    assert label == -1 and view.dtype == torch.uint8 and not view.any()


def test_a_lincls_run_saved_before_the_fast_crop_path_resumes_and_says_its_views_change(tmp_path, capsys):
    """An older hnmix drew the views with torchvision's RandomResizedCrop: the same distribution, other
    draws. Its run resumes (its epochs are not thrown away), with a warning that the classifier will
    not be bit for bit an uninterrupted run's; a run of this version resumes without one."""
    def run(lincls_dir: Path, *more: str) -> int:
        return main(["test_resnet", "--dataset", "synthetic", "-i", "32", "--batch_size", "64", "--num_workers", "0",
                     "--seed", "0", "--synthetic_size", "20", "--protocol", "lincls", "--lincls_epochs", "2",
                     "--lincls_batch_size", "8", "--lincls_dir", str(lincls_dir), *more])

    now, older = tmp_path / "now", tmp_path / "older"
    assert run(now, "--lincls_stop_at", "1") == 0
    shutil.copytree(now, older)
    state_file = older / "epoch_0001" / "lincls_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("train_views").startswith("hnmix.data.geometric.one_crop")
    state_file.write_text(json.dumps(state) + "\n")  # as an older hnmix wrote it
    capsys.readouterr()

    assert run(now, "--resume") == 0
    assert "bit for bit" not in capsys.readouterr().err
    assert run(older, "--resume") == 0
    err = " ".join(capsys.readouterr().err.split())  # the log's lines are wrapped
    assert "trained on views drawn by torchvision's RandomResizedCrop on PIL images (an older hnmix)" in err
    assert "the classifier will not be bit for bit that of an uninterrupted run" in err
    report = json.loads((older / "evaluation_lincls.json").read_text())
    assert report["lincls_epochs_done"] == 2 and report["settings"]["lincls_resumed"]
    assert "train_views" in json.loads((older / "epoch_0002" / "lincls_state.json").read_text())
