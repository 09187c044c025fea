"""python -m hnmix.evaluate sizes its DataLoader workers as the trainer does: this process's share of
the node's usable cores, less one (`hnmix.data.workers.default_num_workers`), not at most 4. The CPU
affinity and a cgroup quota are what the machine has, so the test sets them (monkeypatch), as
tests/train/test_workers_default.py does."""

from __future__ import annotations

import json
import os

import pytest
from accelerate import Accelerator

from hnmix.data import workers
from hnmix.evaluate.cli import build_parser, main, resolve_num_workers


@pytest.fixture
def cores(monkeypatch, tmp_path):
    """cores(n): this process may run on n cores, with no cgroup CPU quota."""
    monkeypatch.setattr(workers, "CGROUP_CPU_MAX", tmp_path / "no-cgroup" / "cpu.max")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return lambda n: monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


def test_the_default_workers_are_the_trainers_share_of_the_cores(cores, monkeypatch):
    accelerator = Accelerator(cpu=True)
    cores(16)  # MoCo's main_lincls.py uses 32 workers; evaluate's own default used to stop at 4
    assert resolve_num_workers(build_parser().parse_args(["resnet18"]), accelerator) == \
        (15, "auto: 16 usable cores / 1 process(es) on this node, less 1 for the main process")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this node (accelerate launch sets it)
    assert resolve_num_workers(build_parser().parse_args(["resnet18"]), accelerator)[0] == 7
    assert resolve_num_workers(build_parser().parse_args(["resnet18", "--num_workers", "3"]), accelerator) == \
        (3, "--num_workers")


def test_an_evaluation_reports_the_workers_it_used(cores, tmp_path, capsys):
    cores(2)
    out = tmp_path / "knn.json"
    code = main(["test_resnet", "--dataset", "synthetic", "--synthetic_size", "24", "-i", "16", "--batch_size", "8",
                 "--knn_k", "3", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["settings"]["num_workers"] == 1
    assert "DataLoader workers per process: 1 (auto: 2 usable cores" in capsys.readouterr().err
