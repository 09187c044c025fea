"""Fixtures shared by several test files, and the number of test workers."""

import logging
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def root_logger_as_it_was():
    """The trainer's start-up (run in-process by some tests) configures the root logger with
    `force=True`: the tests after it in the same worker must not inherit its handler and level."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: tiny convolutions (blurs, grouped convolutions) are tens of
    times slower with 2 threads on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers start with COLUMNS=80 and LINES=24 in their environment, which the
    # trainers they start would take as a terminal's size (rich wraps their log lines at 80).
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, at most 4, since many tests start
    two trainer processes of their own."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


# The test files that take longest (minutes each on 2 cores), slowest first by the CPU-seconds of
# their processes and all they start (measured 2026-12): collected first, so that the workers do
# not end the run waiting on one of them started last.
SLOWEST_FILES = ("tests/train/test_train.py", "tests/train/test_launchers.py", "tests/tools/test_gpu_check.py",
                 "tests/bench/test_overhead.py", "tests/train/test_resume_world_size.py", "tests/train/test_dir_out.py",
                 "tests/bench/test_bench.py", "tests/train/test_training_recipe.py", "tests/train/test_two_nodes.py",
                 "tests/tools/test_gpu_learn.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return SLOWEST_FILES.index(path) if path in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order
