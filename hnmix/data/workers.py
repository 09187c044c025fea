"""DataLoader workers that outlive the run's stop signals.

Launchers deliver a stop signal to a whole process tree or group, DataLoader workers included:
accelerate >= 1.16's single-process launcher terminates the trainer's tree, torch's elastic agent
`killpg`s each trainer's process group, SLURM signals every process of the job step. A worker
killed by it makes the trainer raise "DataLoader worker ... is killed by signal" in the middle of
the step it should finish and save. So workers ignore the signals the trainer handles; they exit
when the trainer shuts its loaders down, or, if the trainer dies, when torch's worker watchdog
sees their parent gone.

One exit path needs help: a process that ends while a loader's workers still run (persistent
workers whose iterator was never shut down) has Python's multiprocessing SIGTERM its daemon
children and then join them, which would wait forever on workers that ignore SIGTERM. An exit
handler, registered after multiprocessing's and so run before it, SIGKILLs them first.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal

# The signals the trainer turns into "save and stop" (hnmix.train.preemption): SIGTERM from
# schedulers and launchers, SIGINT from Ctrl-C, SIGUSR1 from SLURM's `--signal=USR1@...`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: this worker ignores `STOP_SIGNALS`."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


def kill_daemon_children() -> None:
    """SIGKILL this process's daemon children (DataLoader workers are daemons) and reap them.
    torch's SIGCHLD handler would raise on the first reaped worker and leave the others to
    multiprocessing's join, so it is set back to the default first."""
    daemons = [child for child in multiprocessing.active_children() if child.daemon]
    if not daemons:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in daemons:
        child.kill()
    for child in daemons:
        child.join(timeout=5)


atexit.register(kill_daemon_children)
