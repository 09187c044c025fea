"""`python -m hnmix.bench overhead`: it counts the kernel launches of the bare loop and of the
trainer's step, and the trainer's own launches do not grow with the network: no per-layer,
per-buffer or per-parameter loop in the step (BatchNorm hold-back, momentum update, optimizer,
clipping). Split BN costs a fixed handful of launches per BatchNorm layer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from hnmix.bench.overhead import NOT_WORK, ops_per_step

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--img_size", "32", "--batch_size", "8", "--k_moco", "64", "--dim_moco", "16", "--n_hard", "8",
         "--s1_hard", "4", "--s2_hard", "4", "--measure_steps", "1", "--time_steps", "1"]


def run_overhead(tmp_path, archs, splits, *extra, env=None):
    out = tmp_path / "overhead.json"
    command = [sys.executable, "-m", "hnmix.bench", "overhead", "--archs", archs, "--splits", splits, *SMALL, *extra,
               "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=None if env is None else os.environ | env)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(out.read_text())


def batchnorm_layers(arch):
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=0)
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_overhead_reports_bare_and_trainer_launches_and_times_per_row_with_their_ratio(tmp_path):
    """Rows per model, split and mode; a compiled mode's row goes through compile_step (inductor is
    disabled here: it takes minutes on 2 cores; the GPU check compiles for real)."""
    stdout, result = run_overhead(tmp_path, "test_resnet", "1,2", "--modes", "eager,reduce-overhead",
                                  "--time_steps", "2", env={"TORCH_COMPILE_DISABLE": "1"})
    assert "Kernel launches per step" in stdout and "top-level aten ops" in result["rule"]
    assert [(row["arch"], row["bn_splits"], row["mode"]) for row in result["rows"]] == [
        ("test_resnet", 1, "eager"), ("test_resnet", 1, "reduce-overhead"),
        ("test_resnet", 2, "eager"), ("test_resnet", 2, "reduce-overhead")]
    assert result["timed_steps"] == 2
    for row in result["rows"]:
        for name in ("bare", "trainer"):
            assert row[f"{name}_host_ms"] > 0 and row[f"{name}_step_ms"] > 0
            assert row[f"{name}_images_per_s"] == pytest.approx(8 * 1000 / row[f"{name}_step_ms"])
            assert row[f"{name}_cuda_launches"] is None and row[f"{name}_gpu_busy_ms"] is None  # CPU: no device events
        assert row["trainer"] > row["bare"] > 0
        assert row["ratio"] == row["trainer"] / row["bare"]
        assert row["trainer_host_reads"] == 0  # the step never waits for the device
        assert sum(row["trainer_by_op"].values()) == row["trainer"]
        assert not any(name.removeprefix("aten::") in NOT_WORK for name in row["trainer_by_op"])
    assert result["rows"][0]["bare"] == result["rows"][1]["bare"]  # the bare loop is the network, unsplit
    assert result["config"]["img_size"] == 32 and result["config"]["optimizer"] == "sgd"


def test_the_trainers_own_launches_do_not_grow_with_the_network_and_split_bn_costs_a_few_per_layer(tmp_path):
    """resnet10t (4 residual blocks) against resnet14t (6): the same step machinery on more
    BatchNorm layers and parameters. A per-buffer hold-back of the BatchNorm statistics, a
    per-parameter momentum update or optimizer step would add launches with every layer."""
    shallow, deep = "resnet10t", "resnet14t"
    _, result = run_overhead(tmp_path, f"{shallow},{deep}", "1,2")
    rows = {(row["arch"], row["bn_splits"]): row for row in result["rows"]}
    extra = {key: row["trainer"] - row["bare"] for key, row in rows.items()}
    assert rows[(deep, 1)]["bare"] > rows[(shallow, 1)]["bare"]
    assert abs(extra[(deep, 1)] - extra[(shallow, 1)]) <= 1
    # Split BN, per layer: in each encoder the repeat of its parameters (one cat) and a copy into
    # the grouped layout and one back, and backward a copy each way and the weight's and bias's
    # sums: 10 (a per-group loop, or autograd's repeats and copies, cost twice that and more).
    layers = {arch: batchnorm_layers(arch) for arch in (shallow, deep)}
    assert layers[deep] > layers[shallow]
    split_cost = {arch: rows[(arch, 2)]["trainer"] - rows[(arch, 1)]["trainer"] for arch in layers}
    per_layer = (split_cost[deep] - split_cost[shallow]) / (layers[deep] - layers[shallow])
    assert per_layer <= 12
    assert split_cost[shallow] <= per_layer * layers[shallow] + 12  # a few per step besides (the shuffle)


def test_views_and_allocations_are_not_counted_but_the_copies_they_make_are():
    x = torch.randn(4, 6)

    def step():
        x.t().reshape(-1)  # reshape of a transposed tensor copies: one clone
        x.view(2, 12).unsqueeze(0).expand(3, 2, 12)
        torch.empty(3)
        x.add(1)

    counts = ops_per_step(step, warmup=0, measure=2)
    assert counts == {"aten::clone": 1, "aten::add": 1}


def test_an_unknown_mode_is_one_line(tmp_path):
    command = [sys.executable, "-m", "hnmix.bench", "overhead", "--modes", "eager,fast", *SMALL]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        "argument --modes: fast is not a mode; choose from eager,default,reduce-overhead,max-autotune")
