"""Run a script or module on 2 real CPU processes through `accelerate launch`."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_command(target: list[str], *, num_processes: int = 2, env: dict | None = None):
    """(command, environment) of `accelerate launch` with explicit flags (no user config is read).

    ACCELERATE_USE_CPU=1 with --multi_gpu gives real CPU processes over gloo
    (`--cpu --num_processes 2` would silently run one).
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        *target,
    ]
    full_env = os.environ | {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return command, full_env | (env or {})


def accelerate_launch(target: list[str], *, num_processes: int = 2, timeout: float = 600, env: dict | None = None):
    """Run `accelerate_launch_command` to its end; returns the CompletedProcess."""
    command, full_env = accelerate_launch_command(target, num_processes=num_processes, env=env)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def two_node_commands(target: list[str], *, env: dict | None = None):
    """([command of node 0, command of node 1], environment): two `accelerate launch`es with one
    CPU process each that join as two machines over loopback (rendezvous on node 0)."""
    port = str(free_port())
    commands = [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", *target]
                for rank in (0, 1)]
    full_env = os.environ | {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return commands, full_env | (env or {})
