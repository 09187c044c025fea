"""`hnmix.bench`: the mixing benchmark runs end to end, and its materialising reference is right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from method.test_negative_types import EXTRAPOLATION

from hnmix.bench.cli import build_parser
from hnmix.bench.mixing import make_inputs, materialised_mochi_logits, mixing_argv, mixing_config, variant_logits
from hnmix.mixing import NEGATIVE_TYPES, mix_logits, register_negative_type

ROOT = Path(__file__).resolve().parents[2]


def test_mixing_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "hnmix.bench", "mixing", "--batch", "8", "--queue", "64", "--dim", "16",
        "--n_hard", "8", "--s1", "4", "--s2", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu",
        "--json", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)  # peak memory starts a fresh interpreter per variant
    assert done.returncode == 0, done.stderr
    assert "target <= 0.5" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"moco", "hnmix", "materialised"}
    for variant in result["variants"].values():
        assert variant["ms_median"] > 0
        assert variant["peak_extra_bytes"] >= 0
    assert result["config"]["n_hard"] == 8 and result["torch"] == torch.__version__


def _inputs(dtype, B=6, K=40, d=12):
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(B, d, generator=g), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(B, d, generator=g), dim=1).to(dtype)
    queue = F.normalize(torch.randn(K, d, generator=g), dim=1)
    ids = torch.arange(B)
    queue_ids = torch.randint(0, 3 * B, (K,), generator=g)  # some duplicates of the batch ids
    return q, k, queue, ids, queue_ids


def _mixed_logits(*args, **kwargs):
    return mix_logits(*args, **kwargs).logits


def _logits_and_grad(fn, q, k, queue, ids, queue_ids, **sizes):
    q = q.detach().clone().requires_grad_()
    generator = torch.Generator().manual_seed(7)
    logits = fn(q, k, queue, temperature=0.2, ids=ids, queue_ids=queue_ids, generator=generator, **sizes)
    F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long)).backward()
    return logits.detach(), q.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [dict(n_hard=8, s1=5, s2=3), dict(n_hard=8, s1=0, s2=4), dict(n_hard=3, s1=6, s2=0)])
def test_materialised_matches_mix_logits(dtype, sizes):
    inputs = _inputs(dtype)
    fast, fast_grad = _logits_and_grad(_mixed_logits, *inputs, **sizes)
    slow, slow_grad = _logits_and_grad(materialised_mochi_logits, *inputs, **sizes)
    assert slow.dtype == torch.float32 and slow.shape == fast.shape
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    torch.testing.assert_close(slow_grad, fast_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_unmasked", [0, 1])
def test_materialised_matches_mix_logits_with_too_few_hard_negatives(n_unmasked):
    """A row with < 2 unmasked queue entries gets -inf type-1 logits, with none also -inf type 2."""
    q, k, queue, ids, _ = _inputs(torch.float32, K=8)
    queue_ids = torch.zeros(8, dtype=torch.long)  # all duplicates of row 0 ...
    queue_ids[:n_unmasked] = 100  # ... but these
    sizes = dict(n_hard=8, s1=4, s2=3)
    fast, fast_grad = _logits_and_grad(_mixed_logits, q, k, queue, ids, queue_ids, **sizes)
    slow, slow_grad = _logits_and_grad(materialised_mochi_logits, q, k, queue, ids, queue_ids, **sizes)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    torch.testing.assert_close(slow_grad, fast_grad, atol=1e-5, rtol=1e-4)
    type1, type2 = slow[0, 9:13], slow[0, 13:]
    assert torch.isneginf(type1).all()
    assert torch.isneginf(type2).all() == (n_unmasked == 0)
    assert torch.isfinite(slow[1:]).all()


@pytest.fixture
def extrapolation():
    register_negative_type(EXTRAPOLATION)
    yield EXTRAPOLATION
    del NEGATIVE_TYPES[EXTRAPOLATION.name]


def test_mixing_benchmark_has_a_count_flag_and_columns_per_registered_type(extrapolation):
    defaults = build_parser().parse_args(["mixing"])
    assert (defaults.s1, defaults.s2, defaults.s3) == (1024, 512, 0)
    args = build_parser().parse_args(["mixing", "--batch", "4", "--queue", "16", "--dim", "8", "--n_hard", "4",
                                      "--s1", "2", "--s2", "1", "--s3", "3", "--device", "cpu"])
    cfg = mixing_config(args)
    assert cfg.sizes == {"s1": 2, "s2": 1, "s3": 3} and "--s3=3" in mixing_argv(cfg)
    x = make_inputs(cfg)
    for variant, synthetic in (("moco", 0), ("hnmix", 6), ("materialised", 6)):
        assert variant_logits(variant, x, cfg, torch.Generator()).shape == (4, 1 + 16 + synthetic), variant


def test_train_benchmark_runs_the_full_trainer_on_generated_jpegs(tmp_path):
    out = tmp_path / "train.json"
    command = [
        sys.executable, "-m", "hnmix.bench", "train", "--warmup_steps", "1", "--measure_steps", "2",
        "--images", "24", "--json", str(out),
        # hnmix.train options, overriding the seed configuration to keep CI fast:
        "-a", "test_resnet", "-i", "32", "-bs", "8", "-km", "64", "--num_workers", "1",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "full trainer (data pipeline)" in done.stdout and "MoCHi costs" in done.stdout
    result = json.loads(out.read_text())
    assert result["trainer_images_per_s"] > 0 and result["measured_steps"] == 2
    assert len(result["images_per_s"]) == 4 and all(v > 0 for v in result["images_per_s"].values())
    assert result["ratio_to_bare_loop"]["bare loop (encoder fwd+bwd, key fwd; in-memory)"] == 1.0
    assert result["config"]["n_hard"] == 32 and result["config"]["arch"] == "test_resnet"  # seed n_hard kept


def test_write_jpeg_folder_gives_class_folders_of_varied_jpegs(tmp_path):
    from PIL import Image

    from hnmix.bench.train import write_jpeg_folder

    write_jpeg_folder(tmp_path, count=10, classes=3)
    files = sorted(tmp_path.glob("class_*/*.jpg"))
    assert len(files) == 10 and len({f.parent.name for f in files}) == 3
    sizes = {Image.open(f).size for f in files}
    assert len(sizes) > 1 and all(200 <= w < 500 and 160 <= h < 400 for w, h in sizes)


def test_data_benchmark_reports_each_worker_count_both_modes_and_the_batched_photometric(tmp_path):
    out = tmp_path / "data.json"
    command = [sys.executable, "-m", "hnmix.bench", "data", "--max_workers", "2", "--img_size", "32", "--images", "24",
               "--batches", "2", "--batch_size", "4", "--jpeg_size", "96x64", "--device", "cpu", "--repeats", "1",
               "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["per_core_images_per_s"]) == {"1", "2"} and all(v > 0 for v in result["images_per_s"].values())
    in_workers = result["photometric_in_workers"]
    assert set(in_workers["per_core_images_per_s"]) == {"1", "2"} and all(v > 0 for v in in_workers["images_per_s"].values())
    assert result["decode_only_images_per_s"] > 0
    assert result["batched_photometric"]["images_per_s"] > 0 and result["batched_photometric"]["batch_size"] == 4
    assert result["jpeg_size"] == "96x64"
    assert "batched photometric" in done.stdout and "JPEG decode alone" in done.stdout
    assert "kept_in_memory" not in result  # 64 px images for 32 px views: a crop could come from a reduced decode


def test_data_benchmark_reads_a_cifar_layout_dataset_with_its_recipe_and_keeps_it_decoded_in_memory(tmp_path):
    from data_images import write_cifar10_like_repo

    repo = write_cifar10_like_repo(tmp_path / "cifar10", {"train": 16})
    out = tmp_path / "data.json"
    command = [sys.executable, "-m", "hnmix.bench", "data", "--workers", "1", "--dataset", str(repo),
               "--config", "configs/moco_cifar10.yaml", "--batches", "2", "--batch_size", "4", "--device", "cpu",
               "--repeats", "1", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["img_size"] == 32 and result["data"] == f"{repo} split train (16 images)"
    assert "crop 0.08-1" in result["augmentation"] and "cifar10 normalisation" in result["augmentation"]
    kept = result["kept_in_memory"]
    assert set(kept["images_per_s"]) == set(result["images_per_s"]) == {"1"} and kept["images_per_s"]["1"] > 0
    assert kept["photometric_in_workers"]["images_per_s"]["1"] > 0 and kept["decode_all_seconds"] > 0
    assert "kept in memory" in done.stdout


def test_data_benchmark_measures_the_lincls_loader_on_the_same_images(tmp_path):
    """`bench data --lincls`: the loader of `hnmix.evaluate --protocol lincls` next to the trainer's
    crop row, for each worker count and both storages (96 x 64 JPEGs for 64 px views: kept in memory)."""
    out = tmp_path / "data.json"
    command = [sys.executable, "-m", "hnmix.bench", "data", "--workers", "1", "--img_size", "64", "--images", "24",
               "--batches", "2", "--batch_size", "4", "--jpeg_size", "96x64", "--device", "cpu", "--repeats", "1",
               "--lincls", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lincls = json.loads(out.read_text())["lincls_loader"]
    assert set(lincls) == {"decoded at every draw", "kept in memory"}
    for storage, rows in lincls.items():
        assert set(rows["images_per_s"]) == set(rows["of_crop_row"]) == {"1"} and rows["images_per_s"]["1"] > 0
        assert f"lincls: crop, flip -> uint8, {storage}" in done.stdout
