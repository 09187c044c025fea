"""DataLoader workers: how many, how many batches they keep ready, and stop signals they outlive.

How many: this process's share of the usable cores, less one (`default_num_workers`). How many
batches: workers hand batches over in /dev/shm, which a container may keep small (Docker: 64 MiB),
so each keeps at most as many ready as fit there (`fit_prefetch`), and a loader that cannot fit
one per worker is refused before any worker starts.

Stop signals: launchers signal the whole process tree or group (accelerate >= 1.16 terminates
the trainer's tree, torch's elastic agent `killpg`s, SLURM signals every process of the step),
and a killed worker makes the trainer raise "DataLoader worker ... is killed by signal" in the
step it should finish and save. So workers ignore the signals the trainer handles; they exit when
the trainer shuts its loaders down, or when torch's worker watchdog sees their parent gone.
At exit, multiprocessing SIGTERMs its daemon children and joins them, which would wait forever on
such workers still running: an exit handler, registered after multiprocessing's and so run before
it, SIGKILLs them first.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hnmix.errors import ConfigError

MIB = 2**20

# The trainer's "save and stop" signals (hnmix.train.preemption): launchers', Ctrl-C, SLURM's --signal=USR1@.
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


# cgroup v2's CPU quota of this container ("QUOTA PERIOD" in microseconds, or "max PERIOD").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit() -> Optional[int]:
    """The CPUs a cgroup v2 quota allows (rounded up), or None without a quota."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return None


def usable_cores() -> tuple[int, str]:
    """(cores this process may run on, where that number comes from): its CPU affinity (cpusets),
    else os.cpu_count(), and at most a cgroup's CPU quota."""
    if hasattr(os, "sched_getaffinity"):
        cores, source = len(os.sched_getaffinity(0)), "usable cores"
    else:
        cores, source = os.cpu_count() or 1, "cores"
    limit = cgroup_cpu_limit()
    if limit is not None and limit < cores:
        return limit, f"cores of the cgroup CPU quota ({CGROUP_CPU_MAX})"
    return cores, source


def local_processes(num_processes: int) -> int:
    """Training processes on this node: LOCAL_WORLD_SIZE, which torchrun and `accelerate launch`
    set, else `num_processes` (all of them, the cautious guess)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else max(1, num_processes)


def default_num_workers(processes_on_node: int) -> tuple[int, str]:
    """(DataLoader workers per process, how that was derived): this process's share of the node's
    usable cores, less one for the process itself, at least 1 (Lightning's `suggested_max_num_workers`)."""
    cores, source = usable_cores()
    workers = max(1, cores // processes_on_node - 1)
    return workers, f"auto: {cores} {source} / {processes_on_node} process(es) on this node, less 1 for the main process"


def workers_per_process(requested: Optional[int], num_processes: int) -> tuple[int, str]:
    """(DataLoader workers per process, how that was chosen): `requested`, else `default_num_workers`."""
    if requested is not None:
        return requested, "--num_workers"
    return default_num_workers(local_processes(num_processes))


SHM_PATH = "/dev/shm"  # where DataLoader workers put their batches
MAX_PREFETCH = 4  # batches ready per worker at most (torch's default 2; 4 smooths slow JPEGs)
SHM_SHARE = 0.8  # of the free space, for the training loader (the kNN monitor's and others need some)


def shm_free_bytes() -> Optional[int]:
    """Free bytes of /dev/shm, or None where there is none (then nothing is bounded)."""
    try:
        stat = os.statvfs(SHM_PATH)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


@dataclass(frozen=True)
class PrefetchFit:
    """How many batches each worker keeps ready; needed_bytes, what this process's loader holds at
    once (`in_flight_bytes`); free_bytes, /dev/shm's free space (None: no /dev/shm)."""

    prefetch_factor: int
    needed_bytes: int
    free_bytes: Optional[int]
    processes: int

    def describe(self) -> str:
        if self.free_bytes is None:
            return f"{self.prefetch_factor} batches ready per worker (no {SHM_PATH} to bound them)"
        shared = f", for each of {self.processes} processes on this node" if self.processes > 1 else ""
        return (f"{self.prefetch_factor} batches ready per worker ({mib(self.needed_bytes)} of {SHM_PATH}'s "
                f"{mib(self.free_bytes)} free{shared})")


def mib(size: float) -> str:
    """`size` bytes in MiB, to 0.1 below 10 MiB."""
    return f"{size / MIB:,.{1 if size < 10 * MIB else 0}f} MiB"


def in_flight_bytes(batch_bytes: int, num_workers: int, prefetch_factor: int) -> int:
    """Bytes of shared memory one loader holds: every worker's ready batches, and the one the
    main process is using."""
    return (num_workers * prefetch_factor + 1) * batch_bytes


def fit_prefetch(batch_bytes: int, num_workers: int, *, processes: int = 1) -> PrefetchFit:
    """The largest prefetch_factor <= MAX_PREFETCH whose batches fit in SHM_SHARE of /dev/shm's
    free space, shared by the `processes` loaders of this node; a ConfigError when even one batch
    per worker does not fit (the workers would die with a bus error at their first batch)."""
    free = shm_free_bytes()
    if free is None:
        return PrefetchFit(MAX_PREFETCH, in_flight_bytes(batch_bytes, num_workers, MAX_PREFETCH), None, processes)
    budget = free * SHM_SHARE / processes
    for prefetch in range(MAX_PREFETCH, 0, -1):
        needed = in_flight_bytes(batch_bytes, num_workers, prefetch)
        if needed <= budget:
            return PrefetchFit(prefetch, needed, free, processes)
    needed = in_flight_bytes(batch_bytes, num_workers, 1) * processes / SHM_SHARE
    wanted_gib = math.ceil(in_flight_bytes(batch_bytes, num_workers, MAX_PREFETCH) * processes / SHM_SHARE / 2**30)
    raise ConfigError(
        f"{SHM_PATH} has {mib(free)} free, the training DataLoader needs at least {mib(needed)} there "
        f"({num_workers + 1} batches of {mib(batch_bytes)}, one per worker and the one in use, for each of "
        f"{processes} process(es) on this node, and {1 - SHM_SHARE:.0%} spare); give it more (Docker: "
        f"--shm-size={wanted_gib}g), or lower --num_workers or --batch_size")
