"""Two machines, tested on one: two `accelerate launch`es (--num_machines 2, one CPU process each)
joined over loopback train one run, stop together on a SIGTERM to one node, and resume exactly."""

import json
import signal
import subprocess
import time

import pytest

from launch import REPO, two_node_commands
from tiny_run import TINY, checkpoints, losses, metrics

pytestmark = pytest.mark.multiprocess
COMMON = ["-m", "hnmix.train", *TINY, "-bs", "4", "-s", "400", "-sp", "1", "-ss", "1000", "--num_workers", "0",
          "--eval_every", "0"]


def start_nodes(dir_out, *extra):
    commands, env = two_node_commands([*COMMON, "-do", str(dir_out), *extra])
    return [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for command in commands]


def finish(nodes, timeout=400):
    return [(node.wait(timeout=timeout), node.stderr.read()) for node in nodes]


def test_two_nodes_train_stop_on_a_signal_to_one_and_resume_exactly(tmp_path):
    """The nodes agree on a stop about once a second, so the run is long enough (400 steps) to
    stop well before its end; the reference trains to the stopped step + 2 only."""
    stopped = tmp_path / "stopped"
    nodes = start_nodes(stopped)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((stopped / "metrics.jsonl").exists() and len(metrics(stopped)) >= 2):
        time.sleep(0.05)
    nodes[1].send_signal(signal.SIGTERM)  # node 1's launcher only
    results = finish(nodes)
    [stopped_at] = checkpoints(stopped)
    step = int(stopped_at.split("_")[1])
    assert 2 <= step < 400, results[0][1][-2000:]
    checkpoint = stopped / "checkpoints" / stopped_at
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    assert stopped_at in (stopped / "STOPPED").read_text()  # what a requeue script reads
    first, second = json.loads((checkpoint / "trainer_state.json").read_text())["queue_sha256_per_rank"]
    assert first == second  # both nodes hold the same queue

    straight = tmp_path / "straight"
    for code, stderr in finish(start_nodes(straight, "--stop_at", str(step + 2))):
        assert code == 0, stderr[-3000:]
    assert json.loads((straight / f"checkpoints/step_{step + 2:08d}/trainer_state.json").read_text())["num_processes"] == 2
    for code, stderr in finish(start_nodes(stopped, "--resume", "latest", "--stop_at", str(step + 2))):
        assert code == 0, stderr[-3000:]
    expected = losses(straight)
    assert sorted(expected) == list(range(1, step + 3))
    assert losses(stopped) == expected
