"""DataLoader workers ignore the run's stop signals, and still never keep a process from exiting."""

import os
import subprocess
import sys
import textwrap

from launch import REPO

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from hnmix.data.workers import ignore_stop_signals

    loader = torch.utils.data.DataLoader(list(range(64)), batch_size=4, num_workers=2, persistent_workers=True,
                                         worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    for _ in range(3):  # batches come from the workers in turn: both have run their worker_init_fn
        next(batches)
    workers = [w.pid for w in batches._workers]
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # as a launcher's signal to the whole tree delivers it
    time.sleep(0.5)
    next(batches)  # the workers outlived the signal
    print("alive", *workers, flush=True)
    # exit with the iterator still alive: Python's multiprocessing would SIGTERM and join them
""")


def test_workers_outlive_sigterm_and_the_process_still_exits(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    pids = [int(pid) for pid in done.stdout.split()[1:]]
    assert len(pids) == 2
    for pid in pids:  # reaped, not orphaned
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
