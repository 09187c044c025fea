"""hnmix.data: loading every kind of --dataset, RGB conversion, seeded two-view samples, the loader."""

from __future__ import annotations

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data_images import (
    gradient_16bit,
    hub_like_features,
    palette_image,
    write_caltech_like_repo,
    write_image_folder,
    write_odd_mode_images,
)

from hnmix.augment import moco_v2_photometric
from hnmix.data import (
    EpochSampler,
    TwoViewDataset,
    load_image_dataset,
    make_synthetic_dataset,
    make_train_loader,
    resolve_columns,
)
from hnmix.errors import DataError
from hnmix.images import to_rgb

SPLIT_ROWS = {"train": 7, "validation": 3, "test": 2}


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test reaches the network. huggingface_hub and datasets read HF_HUB_OFFLINE at import,
    so the flags they already hold are patched as well as the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "hf_cache")


def raises_one_line(function, *args, **kwargs) -> str:
    """Call `function`, expect a DataError with a one-line message, return the message."""
    with pytest.raises(DataError) as caught:
        function(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# ----------------------------------------------------------------------------- local layouts


def test_hub_repo_layout_with_parquet_shards_loads_every_split(tmp_path, cache_dir):
    """A local copy of ilee0022/Caltech-256 (data/<split>-00000-of-00001.parquet) goes through
    the same load_dataset call as the Hub id and keeps the Image feature."""
    root = write_caltech_like_repo(tmp_path / "caltech", SPLIT_ROWS)
    for split, rows in SPLIT_ROWS.items():
        dataset = load_image_dataset(str(root), split=split, cache_dir=cache_dir)
        assert len(dataset) == rows
        assert dataset.column_names == ["image", "label", "text"]
        assert isinstance(dataset.features["image"], datasets.Image)
        assert dataset[0]["image"].size == (20, 16)
        assert resolve_columns(dataset) == ("image", "label")


def test_image_folder_gives_a_class_label_per_subfolder(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "folder", {"cat": 3, "dog": 2, "emu": 4})
    dataset = load_image_dataset(str(root), cache_dir=cache_dir)
    assert len(dataset) == 9
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset.features["label"].names == ["cat", "dog", "emu"]
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert resolve_columns(dataset) == ("image", "label")


def test_save_to_disk_dataset_dict_loads_its_split(tmp_path):
    saved = datasets.DatasetDict(
        train=make_synthetic_dataset(12, seed=0, image_size=16),
        validation=make_synthetic_dataset(5, seed=1, image_size=16),
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert len(load_image_dataset(str(tmp_path / "saved"))) == 12
    assert len(load_image_dataset(str(tmp_path / "saved"), split="validation")) == 5
    message = raises_one_line(load_image_dataset, str(tmp_path / "saved"), split="test")
    assert "'test'" in message and "train, validation" in message


def test_a_dataset_saved_without_splits_is_the_train_split_only(tmp_path):
    make_synthetic_dataset(6, seed=0, image_size=16).save_to_disk(str(tmp_path / "single"))
    assert len(load_image_dataset(str(tmp_path / "single"))) == 6
    message = raises_one_line(load_image_dataset, str(tmp_path / "single"), split="validation")
    assert "'train' only" in message


def test_home_relative_path_is_expanded(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_image_folder(tmp_path / "pics", {"a": 2, "b": 2})
    assert len(load_image_dataset("~/pics", cache_dir=cache_dir)) == 4


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_given_the_seed():
    a = make_synthetic_dataset(40, seed=3, image_size=32)
    b = make_synthetic_dataset(40, seed=3, image_size=32)
    assert a["label"] == b["label"]
    for i in (0, 17, 39):
        assert np.array_equal(pixels(a[i]["image"]), pixels(b[i]["image"]))


def test_synthetic_differs_between_seeds_and_between_splits():
    a = make_synthetic_dataset(40, seed=3)
    b = make_synthetic_dataset(40, seed=4)
    assert not np.array_equal(pixels(a[0]["image"]), pixels(b[0]["image"]))
    train = load_image_dataset("synthetic", split="train", seed=3, synthetic_size=40)
    validation = load_image_dataset("synthetic", split="validation", seed=3, synthetic_size=40)
    test = load_image_dataset("synthetic", split="test", seed=3, synthetic_size=40)
    assert np.array_equal(pixels(train[5]["image"]), pixels(a[5]["image"]))
    assert not np.array_equal(pixels(train[5]["image"]), pixels(validation[5]["image"]))
    assert not np.array_equal(pixels(validation[5]["image"]), pixels(test[5]["image"]))


def test_synthetic_has_the_requested_size_classes_and_features():
    dataset = load_image_dataset("synthetic", synthetic_size=37, seed=0)
    assert len(dataset) == 37
    assert dataset.features["label"].names == [f"class_{c}" for c in range(10)]
    assert set(dataset["label"]) == set(range(10))
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    small = make_synthetic_dataset(9, seed=0, num_classes=3, image_size=24)
    assert sorted(small["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert small[0]["image"].size == (24, 24)


def test_synthetic_classes_are_separable_well_above_chance():
    """Nearest class mean of a 4 x 4 thumbnail, fitted on train, scored on validation."""
    train = load_image_dataset("synthetic", split="train", synthetic_size=200, seed=0)
    validation = load_image_dataset("synthetic", split="validation", synthetic_size=100, seed=0)

    def thumbnails(dataset):
        return np.stack([pixels(row["image"].resize((4, 4), Image.BOX)).ravel() for row in dataset]).astype(float)

    train_x, train_y = thumbnails(train), np.array(train["label"])
    means = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    validation_x, validation_y = thumbnails(validation), np.array(validation["label"])
    predicted = ((validation_x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == validation_y).mean() > 0.6  # chance is 0.1


# ----------------------------------------------------------------------------- RGB conversion


def test_to_rgb_converts_every_awkward_mode_to_8_bit_rgb(tmp_path):
    paths = write_odd_mode_images(tmp_path)
    for name, path in paths.items():
        with Image.open(path) as opened:
            converted = to_rgb(opened)
        assert converted.mode == "RGB", name
    assert (pixels(to_rgb(Image.open(paths["L"]))) == 100).all()
    cyan = pixels(to_rgb(Image.open(paths["CMYK"])))
    assert cyan[..., 0].max() < 20 and cyan[..., 1:].min() > 235
    assert (pixels(to_rgb(Image.open(paths["RGBA"]))) == [200, 100, 50]).all()
    assert (pixels(to_rgb(Image.open(paths["1"]))) == 255).all()
    assert (pixels(to_rgb(Image.open(paths["LA"]))) == 0).all()  # fully transparent -> black


def test_palette_images_keep_their_colours_and_transparency_becomes_black():
    opaque = pixels(to_rgb(palette_image()))
    assert (opaque[0, 0] == [0, 0, 0]).all()
    assert (opaque[0, 11] == [255, 0, 0]).all()
    assert (opaque[9, 0] == [0, 255, 0]).all()
    transparent_red = pixels(to_rgb(palette_image(transparent_index=1)))
    assert (transparent_red[0, 11] == [0, 0, 0]).all()
    assert (transparent_red[9, 0] == [0, 255, 0]).all()


def test_alpha_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = [[255, 0], [128, 64]]
    converted = pixels(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (converted[0, 0] == [200, 100, 50]).all()
    assert (converted[0, 1] == [0, 0, 0]).all()
    assert np.abs(converted[1, 0] - [100, 50, 25]).max() <= 1


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    gradient_16bit().save(tmp_path / "depth.png")
    with Image.open(tmp_path / "depth.png") as opened:
        assert opened.mode == "I;16"
        converted = pixels(to_rgb(opened))
    row = converted[0, :, 0]
    assert row[0] <= 1 and row[-1] >= 254
    assert np.all(np.diff(row) >= 0)
    assert 110 <= row[len(row) // 2] <= 145
    assert (converted[..., 0] == converted[..., 2]).all()


def test_16_bit_big_endian_and_32_bit_integer_grey_use_the_16_bit_scale():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert pixels(to_rgb(big_endian))[0, :, 0].tolist() == [0, 1, 128, 255]
    wide = Image.fromarray(np.array([[0, 257, 32896, 70000]], np.int32))
    assert wide.mode == "I"
    assert pixels(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_and_ycbcr_images_convert():
    floating = Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32))
    assert floating.mode == "F"
    assert pixels(to_rgb(floating))[0, :, 0].tolist() == [0, 100, 255]
    ycbcr = Image.new("RGB", (4, 4), (10, 200, 30)).convert("YCbCr")
    assert np.abs(pixels(to_rgb(ycbcr)) - [10, 200, 30]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert opened.size == (40, 20)
        assert to_rgb(opened).size == (20, 40)


def test_awkward_images_go_through_two_view_dataset_end_to_end(tmp_path, cache_dir):
    write_odd_mode_images(tmp_path / "folder" / "odd")
    write_image_folder(tmp_path / "folder", {"plain": 2}, size=12)
    dataset = load_image_dataset(str(tmp_path / "folder"), cache_dir=cache_dir)
    assert len(dataset) == 10
    modes = {row["image"].mode for row in dataset}
    assert {"L", "CMYK", "RGBA", "P", "I;16", "1", "LA", "RGB"} <= modes
    two_views = TwoViewDataset(
        dataset, image_column="image", label_column="label", img_size=16, seed=0, photometric=moco_v2_photometric(16)
    )
    for index in range(len(two_views)):
        view_q, view_k, returned_index, label, unreadable = two_views[index]
        assert unreadable == 0
        assert view_q.shape == view_k.shape == (3, 16, 16)
        assert view_q.dtype == torch.float32 and torch.isfinite(view_q).all()
        assert returned_index == index and label in (0, 1)


# ----------------------------------------------------------------------------- errors


def test_missing_local_path_is_a_data_error(tmp_path):
    for source in (str(tmp_path / "nowhere"), "./not-here", "~/not-here-either", "a/b/c"):
        message = raises_one_line(load_image_dataset, source)
        assert "does not exist" in message and source in message


def test_a_file_is_not_a_dataset_directory(tmp_path):
    (tmp_path / "file.parquet").write_bytes(b"")
    assert "not a directory" in raises_one_line(load_image_dataset, str(tmp_path / "file.parquet"))


def test_unknown_split_lists_the_available_ones(tmp_path, cache_dir):
    root = write_caltech_like_repo(tmp_path / "caltech", SPLIT_ROWS)
    message = raises_one_line(load_image_dataset, str(root), split="valid", cache_dir=cache_dir)
    assert "'valid'" in message and "train, validation, test" in message
    message = raises_one_line(load_image_dataset, "synthetic", split="dev")
    assert "'dev'" in message and "train, validation, test" in message


def test_directory_without_data_files_is_a_data_error(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    message = raises_one_line(load_image_dataset, str(tmp_path / "empty"), cache_dir=cache_dir)
    assert "parquet" in message


def test_empty_dataset_is_a_data_error(tmp_path):
    empty = datasets.Dataset.from_dict({"image": [], "label": [], "text": []}, features=hub_like_features())
    datasets.DatasetDict(train=empty).save_to_disk(str(tmp_path / "empty"))
    assert "no rows" in raises_one_line(load_image_dataset, str(tmp_path / "empty"))


def test_unreachable_hub_id_says_how_to_go_on(cache_dir):
    """HF_HUB_OFFLINE=1 (the autouse fixture) stands for any network failure."""
    message = raises_one_line(load_image_dataset, "nobody-here/no-such-dataset", cache_dir=cache_dir)
    assert "nobody-here/no-such-dataset" in message
    assert "ConnectionError" in message
    assert "--dataset synthetic" in message and "--dataset PATH" in message
    message = raises_one_line(load_image_dataset, "cifar10", cache_dir=cache_dir)
    assert "--dataset synthetic" in message


def test_missing_image_column_names_the_option():
    dataset = datasets.Dataset.from_dict({"picture": ["x"], "label": [0]})
    message = raises_one_line(resolve_columns, dataset)
    assert "--image_column" in message and "picture" in message
    message = raises_one_line(resolve_columns, dataset, "label")
    assert "--image_column" in message and "not images" in message


def test_label_column_choice():
    dataset = make_synthetic_dataset(4, seed=0, image_size=8)
    assert resolve_columns(dataset) == ("image", "label")
    assert resolve_columns(dataset, label_column="none") == ("image", None)
    assert resolve_columns(dataset.rename_column("label", "category")) == ("image", "category")
    assert resolve_columns(dataset.remove_columns("label")) == ("image", None)
    with_text = dataset.add_column("text", ["a", "b", "c", "d"])
    message = raises_one_line(resolve_columns, with_text, label_column="text")
    assert "--label_column" in message
    message = raises_one_line(resolve_columns, dataset, label_column="fine_label")
    assert "--label_column" in message and "fine_label" in message


# ----------------------------------------------------------------------------- two views


def synthetic_two_views(seed: int = 0, label_column: str | None = "label", size: int = 16) -> TwoViewDataset:
    dataset = make_synthetic_dataset(size, seed=0, image_size=32)
    return TwoViewDataset(
        dataset, image_column="image", label_column=label_column, img_size=24, seed=seed, photometric=moco_v2_photometric(24)
    )


def test_same_epoch_and_index_give_the_same_views_on_separate_objects():
    first, second = synthetic_two_views(), synthetic_two_views()
    torch.manual_seed(1)
    q1, k1, index1, label1, _ = first[3 * 16 + 5]
    torch.manual_seed(2)
    q2, k2, index2, label2, _ = second[3 * 16 + 5]
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert index1 == index2 == 5 and label1 == label2
    assert not torch.equal(q1, k1)


def test_epoch_and_seed_change_the_views():
    two_views = synthetic_two_views()
    q0, k0, index0, _, _ = two_views[5]
    q1, k1, index1, _, _ = two_views[16 + 5]
    assert index0 == index1 == 5
    assert not torch.equal(q0, q1) and not torch.equal(k0, k1)
    q_other_seed, _, _, _, _ = synthetic_two_views(seed=1)[5]
    assert not torch.equal(q0, q_other_seed)


def test_reading_a_sample_leaves_the_global_rng_untouched():
    two_views = synthetic_two_views()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    two_views[7]
    assert torch.equal(torch.get_rng_state(), before)


def test_labels_are_minus_one_without_a_label_column():
    two_views = synthetic_two_views(label_column=None)
    assert two_views[2][3] == -1
    assert synthetic_two_views()[2][3] == make_synthetic_dataset(16, seed=0, image_size=32)[2]["label"]


def test_without_photometric_the_views_are_the_uint8_crops_the_photometric_mode_starts_from():
    """Both modes draw the same crops and flips for a sample: the per-image photometric half
    only comes after them (here replaced by a plain conversion, to compare)."""
    dataset = make_synthetic_dataset(4, seed=0, image_size=32)
    crops_only = TwoViewDataset(dataset, image_column="image", label_column="label", img_size=24, seed=3)
    converted = TwoViewDataset(dataset, image_column="image", label_column="label", img_size=24, seed=3,
                               photometric=transforms.PILToTensor())
    for encoded in (1, 4 + 1):
        view_q, view_k, _, _, _ = crops_only[encoded]
        assert view_q.dtype == torch.uint8 and view_q.shape == view_k.shape == (3, 24, 24)
        assert not torch.equal(view_q, view_k)
        same_q, same_k, _, _, _ = converted[encoded]
        assert torch.equal(view_q, same_q) and torch.equal(view_k, same_k)


# ----------------------------------------------------------------------------- sampler and loader


def test_epoch_sampler_is_a_seeded_permutation_that_encodes_the_epoch():
    a, b = EpochSampler(10, seed=5), EpochSampler(10, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    order = list(a)
    assert order == list(b) and len(a) == 10
    assert sorted(order) == list(range(30, 40))
    a.set_epoch(4)
    next_epoch = list(a)
    assert sorted(next_epoch) == list(range(40, 50))
    assert [i - 40 for i in next_epoch] != [i - 30 for i in order]
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 3)).tolist()
    assert [i - 30 for i in order] == expected


def test_train_loader_with_workers_yields_the_documented_batches():
    two_views = synthetic_two_views(size=24)
    loader = make_train_loader(two_views, batch_size=8, num_workers=2, seed=0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = list(loader)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(batches) == 3
    view_q, view_k, index, label, unreadable = batches[0]
    assert view_q.shape == view_k.shape == (8, 3, 24, 24)
    assert view_q.dtype == view_k.dtype == torch.float32
    assert index.shape == label.shape == unreadable.shape == (8,)
    assert unreadable.sum() == 0
    assert index.dtype == label.dtype == torch.int64
    assert sorted(torch.cat([batch[2] for batch in batches]).tolist()) == list(range(24))
    # The same batch, read in the main process, has the same views as the workers drew.
    q0, k0, _, _, _ = two_views[int(index[0])]
    assert torch.equal(view_q[0], q0) and torch.equal(view_k[0], k0)


def test_train_loader_needs_at_least_one_batch():
    message = raises_one_line(make_train_loader, synthetic_two_views(size=6), batch_size=8, num_workers=0, seed=0)
    assert "--batch_size" in message and "6" in message


def test_an_unreadable_image_is_replaced_counted_and_named(tmp_path, cache_dir, caplog):
    root = write_image_folder(tmp_path / "folder", {"a": 3, "b": 3}, size=12)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "b" / "empty.jpg").write_bytes(b"")
    dataset = load_image_dataset(str(root), cache_dir=cache_dir)
    two_views = TwoViewDataset(
        dataset, image_column="image", label_column="label", img_size=8, seed=0
    )
    broken = next(i for i in range(len(dataset)) if two_views._where(i).endswith("broken.png)"))
    with caplog.at_level("WARNING"):
        view_q, _, index, label, unreadable = two_views[broken]
    assert unreadable >= 1 and index != broken and view_q.shape == (3, 8, 8)
    assert any(f"image {broken} of the dataset" in r.getMessage() and "broken.png" in r.getMessage()
               and "using image" in r.getMessage() for r in caplog.records)
    again = two_views[broken]
    assert again[2] == index and torch.equal(again[0], view_q)  # the replacement is deterministic

    loader = make_train_loader(two_views, batch_size=4, num_workers=2, seed=0)
    batches = list(loader)
    assert all(batch[0].shape[0] == 4 for batch in batches)  # batches keep their size
    # 8 images, 2 unreadable: every unreadable one the sampler drew was counted.
    drawn = torch.cat([batch[4] for batch in batches]).sum().item()
    assert 0 < drawn <= 2 + 2 * 8  # each of the two costs one or more tries


def test_a_dataset_of_unreadable_images_fails_loudly_from_a_worker(tmp_path, cache_dir):
    root = tmp_path / "folder"
    for i in range(4):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = load_image_dataset(str(root), cache_dir=cache_dir)
    two_views = TwoViewDataset(dataset, image_column="image", label_column=None,
                               img_size=8, seed=0)
    loader = make_train_loader(two_views, batch_size=2, num_workers=2, seed=0)
    with pytest.raises(DataError, match="images in a row could not be read"):
        list(loader)


def test_a_one_pixel_image_gives_views_and_a_decompression_bomb_is_replaced(tmp_path, cache_dir, monkeypatch):
    root = write_image_folder(tmp_path / "folder", {"a": 2, "b": 2}, size=12)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "a" / "tiny.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(root / "b" / "bomb.png")
    dataset = load_image_dataset(str(root), cache_dir=cache_dir)
    two_views = TwoViewDataset(dataset, image_column="image", label_column="label",
                               img_size=8, seed=0)
    where = {i: two_views._where(i) for i in range(len(dataset))}
    tiny = next(i for i, w in where.items() if w.endswith("tiny.png)"))
    bomb = next(i for i, w in where.items() if w.endswith("bomb.png)"))
    view_q, view_k, index, _, unreadable = two_views[tiny]
    assert view_q.shape == view_k.shape == (3, 8, 8) and index == tiny and unreadable == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL's bomb guard refuses it
    _, _, index, _, unreadable = two_views[bomb]
    assert unreadable >= 1 and index != bomb
