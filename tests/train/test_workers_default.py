"""--num_workers left out gives each training process its share of the node's cores, less one for
itself; the trainer says how many and why, and refuses a /dev/shm too small for its loader with one
line before any worker starts. The CPU affinity, a cgroup quota and /dev/shm's free space are what
the machine has, so the tests set them (monkeypatch) rather than look for such a machine."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from launch import REPO
from tiny_run import TINY

from hnmix.data import workers
from hnmix.train.config import parse_config

QUICK = [*TINY, "-s", "2", "-sp", "1", "-ss", "2", "--eval_every", "0"]


@pytest.fixture
def cores(monkeypatch, tmp_path):
    """cores(n): this process may run on n cores, with no cgroup CPU quota."""
    monkeypatch.setattr(workers, "CGROUP_CPU_MAX", tmp_path / "no-cgroup" / "cpu.max")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return lambda n: monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


@pytest.mark.parametrize("usable, processes, expected", [(16, 1, 15), (16, 2, 7), (16, 8, 1), (16, 32, 1),
                                                          (2, 1, 1), (1, 1, 1), (9, 4, 1), (64, 8, 7)])
def test_the_default_is_the_process_s_share_of_the_cores_less_one(cores, usable, processes, expected):
    cores(usable)
    count, how = workers.default_num_workers(processes)
    assert count == expected
    assert how == f"auto: {usable} usable cores / {processes} process(es) on this node, less 1 for the main process"


@pytest.mark.parametrize("cpu_max, expected", [("400000 100000\n", 3), ("150000 100000\n", 1), ("max 100000\n", 15),
                                               ("3200000 100000\n", 15)])
def test_a_cgroup_cpu_quota_below_the_affinity_bounds_the_cores(cores, tmp_path, monkeypatch, cpu_max, expected):
    cores(16)
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(workers, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    count, how = workers.default_num_workers(1)
    assert count == expected
    assert ("cgroup CPU quota" in how) == (expected < 15)


def test_the_processes_on_the_node_come_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun and accelerate launch set it
    assert workers.local_processes(8) == 4  # 8 processes on 2 nodes
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert workers.local_processes(8) == 8 and workers.local_processes(1) == 1


def test_num_workers_is_auto_unless_given_and_the_gpu_recipes_leave_it_out():
    assert parse_config([]).data.num_workers is None
    assert parse_config(["--num_workers", "3"]).data.num_workers == 3
    for name in ("mocov2_imagenet", "mochi_imagenet", "mochi_caltech256", "moco_cifar10", "mochi_cifar10"):
        assert parse_config(["--config", str(REPO / f"configs/{name}.yaml")]).data.num_workers is None, name
    assert parse_config(["--config", str(REPO / "configs/demo_cpu.yaml")]).data.num_workers == 2


def start_up_text(capsys) -> str:
    """stderr of an in-process run with rich's wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_the_trainer_uses_the_default_and_logs_how_it_was_derived(cores, tmp_path, capsys):
    from hnmix.train.loop import main

    cores(4)
    assert main([*QUICK, "-do", str(tmp_path / "auto")]) == 0
    text = start_up_text(capsys)
    assert ("DataLoader: 3 worker(s) per process (auto: 4 usable cores / 1 process(es) on this node, less 1 for the "
            "main process), 4 batches ready per worker") in text, text[-3000:]
    assert main([*QUICK, "--num_workers", "0", "-do", str(tmp_path / "given")]) == 0
    assert "DataLoader: 0 worker(s) per process (--num_workers), loading in the main process" in start_up_text(capsys)


def test_a_dev_shm_too_small_ends_the_trainer_with_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    from hnmix.train.loop import main

    monkeypatch.setattr(workers, "shm_free_bytes", lambda: 2**16)  # 64 KiB; one batch of 8 float32 32-px view pairs is 192 KiB
    children = multiprocessing.active_children()
    assert main([*QUICK, "--num_workers", "2", "-do", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("hnmix: error: /dev/shm has 0.1 MiB free, the training DataLoader needs at least"), err
    assert "--shm-size=" in lines[-1] and "--num_workers" in lines[-1] and "--batch_size" in lines[-1]
    assert "Traceback" not in err and "Training test_resnet" not in err
    assert multiprocessing.active_children() == children
    assert not (tmp_path / "out").exists()
