"""Options the machine cannot honour are refused with one line before any compute, and an
allocation that fails anyway ends in one line, not a traceback."""

import pytest
import torch
from tiny_run import TINY, run_train

QUICK = [*TINY, "-s", "2", "-sp", "1", "-ss", "2", "--num_workers", "0", "--eval_every", "0"]


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def refused(argv, capfd) -> str:
    """What the command line's main() printed on stderr, run in this process (a refusal needs no
    trainer start; `python -m hnmix.train` is sys.exit(main())); it must have exited 2."""
    from hnmix.train.loop import main

    code = main(argv)
    stderr = capfd.readouterr().err
    assert code == 2, stderr[-2000:]
    return stderr


def test_an_image_size_whose_batch_cannot_fit_in_memory_is_refused_before_compute(tmp_path, capfd):
    stderr = refused([*QUICK, "-i", "100000", "-do", str(tmp_path / "out")], capfd)
    assert last_line(stderr).startswith("hnmix: error: option img_size=100000")
    assert "--img_size" in last_line(stderr) and "--batch_size" in last_line(stderr)
    assert "Traceback" not in stderr and "Training" not in stderr
    assert not (tmp_path / "out").exists()


def test_an_allocation_that_fails_during_training_ends_in_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from hnmix.moco import MoCo
    from hnmix.train.loop import main

    def forward(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 30000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(MoCo, "forward", forward)
    assert main([*QUICK, "-do", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("hnmix: error: not enough memory"), err[-2000:]
    assert "30000000000 bytes" in lines[-1] and "--img_size" in lines[-1] and "--batch_size" in lines[-1]
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_a_gpu_index_without_a_gpu_is_refused_before_compute(tmp_path, capfd):
    stderr = refused([*QUICK, "--device", "0", "-do", str(tmp_path / "out")], capfd)
    assert last_line(stderr).startswith("hnmix: error: option device=0")
    assert "no GPU" in last_line(stderr) and "--device cpu" in last_line(stderr)
    assert "Training" not in stderr and "Traceback" not in stderr


def test_the_start_line_names_the_device(tmp_path):
    result = run_train(*QUICK, "--device", "cpu", "-do", str(tmp_path / "out"), env_extra={"COLUMNS": "400"})
    assert result.returncode == 0, result.stderr[-2000:]
    [start] = [line for line in result.stderr.splitlines() if "Training test_resnet" in line]
    assert "with 1 process(es) on cpu," in start


WORKER_ALLOCATION_FAILURE = (
    "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    '  File "hnmix/data/geometric.py", line 136, in two_crops\n'
    "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 30000000000 bytes. Error code 12 (Cannot allocate memory)\n")


@pytest.mark.parametrize("error,shown", [
    (RuntimeError(WORKER_ALLOCATION_FAILURE), "(DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                              "30000000000 bytes. Error code 12 (Cannot allocate memory))"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.81 GiB"),
     "(CUDA out of memory. Tried to allocate 20.00 GiB."),
    (MemoryError(), "(MemoryError)"),
])
def test_a_failed_allocation_is_one_line_naming_what_failed_and_the_way_out(error, shown):
    from hnmix.train.components import out_of_memory_line

    line = out_of_memory_line(error)
    assert line.startswith(f"not enough memory {shown}") and "\n" not in line
    assert line.endswith("lower --img_size or --batch_size, or choose a smaller --arch")


def test_other_runtime_errors_keep_their_traceback():
    from hnmix.train.components import out_of_memory_line

    assert out_of_memory_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
