"""hnmix.data.two_views: seeded two-view samples, unreadable images, the epoch sampler and the loader.
"""

from __future__ import annotations

import pytest
import torch
from data_images import (
    raises_one_line,
    write_image_folder,
    write_odd_mode_images,
)
from PIL import Image
from torchvision import transforms

from hnmix.data.sources import load_image_dataset
from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import EpochSampler, TwoViewDataset, make_train_loader
from hnmix.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    unreadable_files = {i for i in range(len(dataset)) if two_views._where(i).endswith(("broken.png)", "empty.jpg)"))}
    with caplog.at_level("WARNING"):
        view_q, _, index, _, unreadable = two_views[broken]
    # Replaced by a readable image (not one of the two unreadable files): one failed read, counted once.
    assert index not in unreadable_files and unreadable == 1 and view_q.shape == (3, 8, 8)
    assert any(f"image {broken} of the dataset" in r.getMessage() and "broken.png" in r.getMessage()
               and "using image" in r.getMessage() for r in caplog.records)
    again = two_views[broken]
    assert again[2] == index and torch.equal(again[0], view_q)  # the replacement is deterministic

    loader = make_train_loader(two_views, batch_size=4, num_workers=2, seed=0)
    batches = list(loader)
    assert all(batch[0].shape[0] == 4 for batch in batches)  # batches keep their size
    # 8 images, 2 unreadable, one epoch: the sampler drew each unreadable file once, and each is
    # counted once (seed 0 replaces both by readable images: no second failed try).
    assert all(two_views[i][2] not in unreadable_files for i in unreadable_files)
    drawn = torch.cat([batch[4] for batch in batches]).sum().item()
    assert drawn == len(unreadable_files) == 2


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
