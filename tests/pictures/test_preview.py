"""python -m hnmix.preview: the grid shows the trainer's crops and views for that seed and epoch."""

import numpy as np
import pytest
import torch
from PIL import Image

from hnmix.data.augmentation import AugmentationSpec
from hnmix.data.photometric import StepPhotometric
from hnmix.data.sources import load_image_dataset
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import EpochSampler, TwoViewDataset
from hnmix.pictures.views import GridLayout, enlarge
from hnmix.preview import main, parse_options, to_display, trainer_views

SIZE, IMG, BATCH, SEED, EPOCH = 24, 32, 8, 7, 1


@pytest.fixture(scope="module")
def dataset():
    return load_image_dataset("synthetic", seed=SEED, synthetic_size=SIZE)


def trainer_dataset(dataset, photometric=None):
    return TwoViewDataset(dataset, image_column="image", label_column="label", img_size=IMG, seed=SEED,
                          photometric=photometric)


def epoch_order():
    sampler = EpochSampler(SIZE, SEED)
    sampler.set_epoch(EPOCH)
    return list(sampler)


@pytest.mark.parametrize("on_accelerator", [False, True])
def test_the_previews_crops_and_views_are_the_trainers(dataset, on_accelerator, one_torch_thread):
    n = BATCH + 2  # into the second batch, whose batched draws belong to the next step
    rows = trainer_views(dataset, image_column="image", label_column="label", img_size=IMG, seed=SEED, epoch=EPOCH,
                         n=n, batch_size=BATCH, on_accelerator=on_accelerator, device=torch.device("cpu"))
    assert len(rows) == n
    crops = trainer_dataset(dataset)
    encoded = epoch_order()
    for row, index in zip(rows, encoded):
        crop_q, crop_k, *_ = crops[index]
        assert torch.equal(row.crop_q, crop_q) and torch.equal(row.crop_k, crop_k)
    if on_accelerator:
        photometric = StepPhotometric(IMG, seed=SEED, rank=0)
        expected = []
        for batch in range(2):
            samples = [crops[i] for i in encoded[batch * BATCH : (batch + 1) * BATCH]]
            views = photometric(torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]),
                                EPOCH * (SIZE // BATCH) + batch)
            expected += list(zip(*views))
    else:
        in_workers = trainer_dataset(dataset, moco_v2_photometric(IMG))
        expected = [in_workers[index][:2] for index in encoded[:n]]
    for row, (view_q, view_k) in zip(rows, expected):
        assert torch.equal(row.view_q, to_display(view_q)) and torch.equal(row.view_k, to_display(view_k))


def test_the_png_holds_those_pixels_cell_for_cell(dataset, tmp_path, one_torch_thread):
    out = tmp_path / "views.png"
    argv = ["--dataset", "synthetic", "--synthetic_size", str(SIZE), "-i", str(IMG), "-n", "3", "--seed", str(SEED),
            "--epoch", str(EPOCH), "-bs", str(BATCH), "--augment_device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = trainer_views(dataset, image_column="image", label_column="label", img_size=IMG, seed=SEED, epoch=EPOCH,
                         n=3, batch_size=BATCH, on_accelerator=False)
    layout = GridLayout.of(3, IMG)
    with Image.open(out) as image:
        assert image.size == (layout.width, layout.height)
        pixels = np.asarray(image.convert("RGB"))
    for r, row in enumerate(rows):
        for column, view in enumerate((row.crop_q, row.view_q, row.crop_k, row.view_k), start=1):
            left, top = layout.cell_box(r, column)
            cell = pixels[top : top + layout.cell, left : left + layout.cell]
            np.testing.assert_array_equal(cell, enlarge(view, layout.scale))


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "synthetic", "-n", "0"], "option n must be >= 1"),
    (["--dataset", "synthetic", "--out", "views.jpg"], "must name a .png"),
    (["-n", "2"], "option dataset is required"),
    (["--dataset", "synthetic", "--synthetic_size", "16", "-bs", "64"], "--batch_size 16"),
    (["--config", "/nonexistent/config.yaml"], "cannot read /nonexistent/config.yaml"),
])
def test_a_bad_option_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv] if "--out" in argv else [*argv, "--out", str(tmp_path / "v.png")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hnmix: error:") and message in error and error.count("\n") == 1, error


@pytest.mark.parametrize("on_accelerator", [False, True])
def test_the_preview_takes_the_augmentation_from_the_config_then_the_flags(dataset, on_accelerator, tmp_path,
                                                                            one_torch_thread):
    """A recipe's (or a run's) augmentation options, a flag overriding one: the crops, flips and
    views are the trainer's for that spec, de-normalised with its statistics."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: synthetic\nsynthetic_size: {SIZE}\nimg_size: {IMG}\nseed: {SEED}\nbatch_size: {BATCH}\n"
                      "crop_scale: [0.08, 1]\nblur_p: 0\nnormalize: cifar10\njitter: 0.4,0.4,0.4,0.1\n")
    args = parse_options(["--config", str(recipe), "--flip_p", "0", "--out", str(tmp_path / "v.png")])
    spec = AugmentationSpec(crop_scale=(0.08, 1.0), flip_p=0.0, blur_p=0.0, normalize="cifar10")
    assert args.augmentation == spec
    rows = trainer_views(dataset, image_column="image", label_column="label", img_size=IMG, seed=SEED, epoch=EPOCH,
                         n=4, batch_size=BATCH, on_accelerator=on_accelerator, device=torch.device("cpu"),
                         augmentation=spec)
    crops = TwoViewDataset(dataset, image_column="image", label_column="label", img_size=IMG, seed=SEED,
                           augmentation=spec)
    encoded = epoch_order()
    for row, index in zip(rows, encoded):
        crop_q, crop_k, *_ = crops[index]
        assert torch.equal(row.crop_q, crop_q) and torch.equal(row.crop_k, crop_k) and row.flips == (False, False)
    assert not torch.equal(rows[0].crop_q, trainer_dataset(dataset)[encoded[0]][0])  # not MoCo v2's crops
    if on_accelerator:
        samples = [crops[i] for i in encoded[:BATCH]]
        views = StepPhotometric(IMG, seed=SEED, rank=0, augmentation=spec)(
            torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), EPOCH * (SIZE // BATCH))
        expected = list(zip(*views))
    else:
        in_workers = TwoViewDataset(dataset, image_column="image", label_column="label", img_size=IMG, seed=SEED,
                                    photometric=moco_v2_photometric(IMG, spec), augmentation=spec)
        expected = [in_workers[index][:2] for index in encoded[:4]]
    for row, (view_q, view_k) in zip(rows, expected):
        assert torch.equal(row.view_q, to_display(view_q, spec)) and torch.equal(row.view_k, to_display(view_k, spec))


def test_a_bad_augmentation_option_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["--dataset", "synthetic", "--crop_scale", "0.9,0.1", "--out", str(tmp_path / "v.png")]) == 2
    error = capsys.readouterr().err
    assert error == "hnmix: error: option crop_scale must be MIN,MAX with 0 < MIN <= MAX <= 1, got 0.9,0.1\n"
