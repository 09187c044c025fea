"""The training loader keeps only as many batches ready as /dev/shm holds, and a /dev/shm too small
for one batch per worker is one line before any worker starts. The free space is the one thing
faked (`hnmix.data.workers.shm_free_bytes`): a small /dev/shm cannot be made without root."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from hnmix.data import workers
from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import TwoViewDataset, make_train_loader
from hnmix.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIB = 2**20


def two_views(*, photometric: bool, img_size: int = 24) -> TwoViewDataset:
    dataset = make_synthetic_dataset(32, seed=0, image_size=32)
    return TwoViewDataset(dataset, image_column="image", label_column="label", img_size=img_size, seed=0,
                          photometric=moco_v2_photometric(img_size) if photometric else None)


def free_shm(monkeypatch, free: int | None) -> None:
    monkeypatch.setattr(workers, "shm_free_bytes", lambda: free)


@pytest.mark.parametrize("photometric", [False, True], ids=["uint8 crops", "float32 views"])
def test_batch_bytes_is_what_a_collated_batch_takes(photometric):
    views = two_views(photometric=photometric)
    batch = next(iter(make_train_loader(views, batch_size=8, num_workers=0, seed=0)))
    assert batch[0].dtype == (torch.float32 if photometric else torch.uint8)
    assert views.batch_bytes(8) == sum(tensor.nbytes for tensor in batch)


def test_the_prefetch_factor_shrinks_to_what_dev_shm_holds_and_the_loader_still_loads(monkeypatch):
    views = two_views(photometric=False)
    batch_bytes = views.batch_bytes(4)
    # Room for 2 batches per worker (and the one in use) in the loader's share, not for 3.
    free_shm(monkeypatch, int(workers.in_flight_bytes(batch_bytes, 2, 2) / workers.SHM_SHARE) + 1)
    loader = make_train_loader(views, batch_size=4, num_workers=2, seed=0)
    assert loader.prefetch_factor == 2
    batches = [batch for _, batch in zip(range(3), loader)]
    assert [batch[0].shape for batch in batches] == [(4, 3, 24, 24)] * 3


def test_the_processes_of_a_node_share_dev_shm(monkeypatch):
    batch_bytes = two_views(photometric=False).batch_bytes(4)
    free_shm(monkeypatch, int(workers.in_flight_bytes(batch_bytes, 2, 4) / workers.SHM_SHARE) + 1)
    assert workers.fit_prefetch(batch_bytes, 2, processes=1).prefetch_factor == 4
    fit = workers.fit_prefetch(batch_bytes, 2, processes=2)  # half each: 4.5 batches, room for 2 x 1 + 1
    assert fit.prefetch_factor == 1 and "for each of 2 processes on this node" in fit.describe()


def test_a_roomy_dev_shm_keeps_four_batches_per_worker(monkeypatch):
    views = two_views(photometric=True)
    free_shm(monkeypatch, 1024 * MIB)
    fit = workers.fit_prefetch(views.batch_bytes(4), 2)
    assert fit.prefetch_factor == workers.MAX_PREFETCH == 4
    assert fit.needed_bytes == 9 * views.batch_bytes(4)
    assert "4 batches ready per worker" in fit.describe() and "1,024 MiB free" in fit.describe()
    free_shm(monkeypatch, None)  # no /dev/shm (not Linux): nothing to bound
    assert make_train_loader(views, batch_size=4, num_workers=1, seed=0).prefetch_factor == 4


def test_a_dev_shm_too_small_for_one_batch_per_worker_is_one_line_before_any_worker_starts(monkeypatch):
    views = two_views(photometric=True, img_size=64)  # 4 x 2 x 3 x 64 x 64 float32: 0.4 MiB a batch
    free_shm(monkeypatch, MIB)
    children = multiprocessing.active_children()
    with pytest.raises(ConfigError) as caught:
        make_train_loader(views, batch_size=4, num_workers=3, seed=0)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("/dev/shm has 1.0 MiB free, the training DataLoader needs at least 1.9 MiB"), message
    assert "--shm-size=" in message and "--num_workers" in message and "--batch_size" in message
    assert multiprocessing.active_children() == children


def test_loading_in_the_main_process_needs_no_shared_memory(monkeypatch):
    free_shm(monkeypatch, 0)
    loader = make_train_loader(two_views(photometric=False), batch_size=4, num_workers=0, seed=0)
    assert next(iter(loader))[0].shape == (4, 3, 24, 24)


def test_shm_free_bytes_reads_the_file_system_and_is_none_without_one(monkeypatch, tmp_path):
    monkeypatch.setattr(workers, "SHM_PATH", str(tmp_path))
    free = workers.shm_free_bytes()
    assert isinstance(free, int) and free > 0
    monkeypatch.setattr(workers, "SHM_PATH", str(tmp_path / "missing"))
    assert workers.shm_free_bytes() is None
