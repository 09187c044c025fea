"""What an export of the encoder leaves in its folder: file modes that follow the umask, and no
evaluation results about the weights it replaced."""

from __future__ import annotations

import os
import stat

import pytest
import timm
import torch

from hnmix.hub.export import current_umask, export_encoder, readable_like_siblings


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process's umask for one test and give the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_every_exported_file_has_the_mode_the_umask_gives(tmp_path, umask, mask):
    # safetensors 0.8 writes model.safetensors 0600: a group member could read config.json but not the weights.
    umask(mask)
    assert current_umask() == mask
    directory = export_encoder(timm.create_model("test_resnet", num_classes=0), tmp_path / "encoder", img_size=32)
    expected = 0o666 & ~mask
    assert {path.name: mode(path) for path in directory.iterdir()} == {
        "config.json": expected, "model.safetensors": expected}


def test_readable_like_siblings_takes_a_checkpoint_directory_or_one_file(tmp_path, umask):
    umask(0o022)
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin"):
        (tmp_path / name).write_bytes(b"x")
        os.chmod(tmp_path / name, 0o600)
    readable_like_siblings(tmp_path)  # what a checkpoint directory gets after Accelerator.save_state
    assert [mode(tmp_path / n) for n in ("model.safetensors", "model_1.safetensors")] == [0o644, 0o644]
    assert mode(tmp_path / "optimizer.bin") == 0o600  # only safetensors files: the others come from open()
    readable_like_siblings(tmp_path / "optimizer.bin")
    assert mode(tmp_path / "optimizer.bin") == 0o644


def test_a_re_export_deletes_the_evaluations_of_the_weights_it_replaces(tmp_path):
    torch.manual_seed(0)
    directory = export_encoder(timm.create_model("test_resnet", num_classes=0), tmp_path / "encoder", img_size=32)
    # What `python -m hnmix.evaluate DIR` leaves there, and what the trainer and the user put there.
    for name in ("evaluation_knn.json", "evaluation_lincls.json", "README.md", "curves.png", "notes.txt"):
        (directory / name).write_text("{}")
    (directory / "lincls" / "epoch_0003").mkdir(parents=True)
    (directory / "lincls" / "classifier.safetensors").write_bytes(b"old")

    export_encoder(timm.create_model("test_resnet", num_classes=0), directory, img_size=32)
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md", "config.json", "curves.png", "model.safetensors", "notes.txt"]
