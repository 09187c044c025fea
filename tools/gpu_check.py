"""`python -m tools.gpu_check` (launch/gpu_check.sh): everything GPU-specific, in one call.

    python -m tools.gpu_check [OUT_DIR] [--dry-run] [--budget_s S] [--sections NAME,...]

A GPU is lent to these sessions now and then, for minutes: the check is one command that spends
them well. Its sections, in order of value:

  setup                the wheels in .whl/ installed against requirements.txt (pip, offline);
                       python, torch, CUDA, cuDNN, the card, the driver; each requirement's
                       installed version; hnmix.train and datasets import
  cuda_tests           pytest tests/cuda and the guard's CUDA test in tests/train/test_optim.py:
                       the whole step in bf16 and fp16 without host synchronisation, mix_logits
                       against the float64 oracle, the batched photometric half against the CPU,
                       --compile with a resume, --deterministic's exact resume
  bench_mixing         `bench mixing`: B=256, K=65536, d=128, n_hard=1024, s1=1024, s2=512
  bench_train_eager    `bench train`: resnet50, 224 px, bf16, batch 256, K=65536, the paper's
                       mixing sizes, generated Caltech-256-like JPEGs, all the host's cores: the
                       bare loop, plain MoCo, MoCHi and the full trainer, with peak GPU memory
  overhead             `bench overhead` on configs/mochi_cifar10.yaml (resnet18, 32 px, batch 512,
                       bn_splits 8) eager, on configs/mochi_imagenet.yaml (resnet50, 224 px, bf16,
                       batch 32) eager, then on the CIFAR recipe compiled reduce-overhead (CUDA
                       graphs), one process each: per step, the bare loop's and the trainer's
                       CUDA launches, host time, GPU busy time, time back to back and images/s
  bench_data           `bench data`: 1, 2, 4, ... and all the host's cores, Caltech-256-like
                       JPEGs, the batched photometric half on the GPU at batch 256
  bench_train_compile  `bench train` as above with --compile --compile_mode reduce-overhead: the
                       compiled step replayed as CUDA graphs (images/s with them, against the
                       eager section's without)

A section runs as its own process (its output goes to the log) within its share of the time
(`--budget_s` over all; a section that would start with under 20 s left is skipped). One that
fails, or runs out of time, is recorded and the next one runs. `--sections` picks some (setup
always runs: a fresh machine needs its wheels), e.g. to rerun what failed.

Each section's cap (`SECTIONS`) is the most it may take; the caps add up to more than the 450 s
of `--budget_s`, so a section gets the smaller of its cap and what the ones before it left, and
the last ones give way: bench_data and bench_train_compile first (the overhead section already
holds images/s with and without CUDA graphs, for the CIFAR recipe), then the overhead section's
compiled run (its eager runs come first and are kept). Rerun what gave way while the machine is
warm, e.g. `--sections bench_data,bench_train_compile --budget_s 300`.

`--dry-run` runs the same sections on the CPU at tiny sizes (CUDA hidden from every section; the
CUDA tests are collected and skip; --compile runs with TORCH_COMPILE_DISABLE=1, since inductor
on two CPU cores takes minutes), so that the check cannot rot: tests/tools/test_gpu_check.py runs
it in CI. The JSON has the same keys in both modes.

Written to OUT_DIR (default: $OUT), the three files the device tool brings back:
  gpu_check.json  every section's status, time, commands and result (the benchmarks' own JSON,
                  the tests' outcomes), the environment, the issue's targets, the table;
                  rewritten after each section, so a run cut short keeps what it measured
  gpu_check.log   every command with its full output
  gpu_check.md    the table for BENCHMARKS.md, headed by card, driver, torch and date
and the same table on stdout. The exit code is 0 when every section selected passed, else 1; a
target missed is a finding in the table, not a failure of the check.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
REQUIREMENTS = REPO / "requirements.txt"
JSON_FILE, LOG_FILE, TABLE_FILE = "gpu_check.json", "gpu_check.log", "gpu_check.md"
BUDGET_S = {"gpu": 450, "dry-run": 600}
MIN_SECTION_S = 20
IMPORTS = ("datasets", "simplejpeg", "hnmix.train.loop", "hnmix.bench.cli")
# What `bench train` calls two of its rows (hnmix/bench/train.py, not imported: it imports torch,
# which the check itself does without, so that only its sections touch the GPU).
BARE_LOOP, FULL_TRAINER = "bare loop (encoder fwd+bwd, key fwd; in-memory)", "full trainer (data pipeline)"
# The tests that show a step without host synchronisation (tests/cuda, tests/train/test_optim.py).
SYNC_TESTS = ("test_training_steps_do_not_synchronise_outside_the_log_lines[bf16]",
              "test_training_steps_do_not_synchronise_outside_the_log_lines[fp16]",
              "test_fused_guarded_step_does_not_synchronise_on_cuda")
# The targets on an H100/H200.
TRAINER_IMAGES_PER_S, OF_BARE_LOOP, MOCHI_OVER_MOCO, MIXING_RATIO = 2500, 0.90, 0.03, 0.5
# bench overhead's runs, (recipe: configs/mochi_RECIPE.yaml, mode), one process each, the eager ones
# first; ImageNet's compiled step is bench_train_compile's (resnet50 at 224 px compiles for minutes).
OVERHEAD_RUNS = (("cifar10", "eager"), ("imagenet", "eager"), ("cifar10", "reduce-overhead"))
# The bound on the trainer's ops per step over the bare loop's (bench overhead's counting
# rule), with bn_splits 1 and with more.
OPS_OF_BARE_ONE_SPLIT, OPS_OF_BARE_SPLITS = 1.5, 2.5
ENVIRONMENT_KEYS = ("python", "platform", "cpu", "cores", "torch", "cuda", "cudnn", "cuda_available", "device_count",
                    "device", "device_memory_mib", "compute_capability", "driver")


def power_of_two_workers(cores: int) -> list[int]:
    """1, 2, 4, ... below `cores`, and `cores`: the worker counts of bench data."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return [*counts, cores]


def bench_arguments(name: str, *, dry_run: bool, cores: int) -> list[str]:
    """The `python -m hnmix.bench` arguments of a benchmark section: the issue's sizes, or tiny ones."""
    if name == "bench_mixing":
        sizes = (["--batch", "8", "--queue", "256", "--dim", "16", "--n_hard", "16", "--s1", "8", "--s2", "8",
                  "--repeats", "1", "--warmup", "0", "--no_peak"] if dry_run else
                 ["--batch", "256", "--queue", "65536", "--dim", "128", "--n_hard", "1024", "--s1", "1024",
                  "--s2", "512", "--repeats", "20", "--warmup", "3"])
        return ["mixing", "--device", "cpu" if dry_run else "cuda", *sizes]
    if name == "bench_data":
        sizes = (["--img_size", "32", "--images", "24", "--batches", "2", "--batch_size", "4",
                  "--photometric_batch_size", "8", "--repeats", "1"] if dry_run else
                 ["--img_size", "224", "--images", "1024", "--batches", "16", "--batch_size", "32",
                  "--photometric_batch_size", "256", "--repeats", "20", "--in_memory_gib", "0"])
        workers = ",".join(map(str, power_of_two_workers(cores)))
        return ["data", "--workers", workers, "--device", "cpu" if dry_run else "cuda", *sizes]
    if name in ("bench_train_eager", "bench_train_compile"):
        sizes = (["--warmup_steps", "0", "--measure_steps", "1", "--images", "8", "-a", "test_resnet", "-i", "32",
                  "-bs", "8", "-km", "64", "-nh", "8", "-s1h", "4", "-s2h", "4", "--num_workers", "1"] if dry_run else
                 ["--warmup_steps", "5", "--measure_steps", "20", "--images", "2048", "-a", "resnet50", "-i", "224",
                  "-bs", "256", "-km", "65536", "-nh", "1024", "-s1h", "1024", "-s2h", "512",
                  "--num_workers", str(cores)])
        compiled = ["--compile", "--compile_mode", "reduce-overhead"] if name == "bench_train_compile" else []
        return ["train", *sizes, "-st1h", "0", "-st2h", "0", "--mixed_precision", "bf16", *compiled]
    raise ValueError(f"no benchmark section {name!r}")


def overhead_arguments(recipe: str, mode: str, *, dry_run: bool) -> list[str]:
    """The `python -m hnmix.bench overhead` arguments of one run: the recipe's own values, or a tiny model."""
    sizes = (["--arch", "test_resnet", "--stem", "default", "--img_size", "32", "--batch_size", "8", "--k_moco", "64",
              "--n_hard", "8", "--s1_hard", "4", "--s2_hard", "4", "--device", "cpu", "--time_steps", "2"] if dry_run
             else ["--device", "cuda", "--time_steps", "20"])
    return ["overhead", "--config", f"configs/mochi_{recipe}.yaml", "--modes", mode, "--measure_steps", "2", *sizes]


class SectionFailed(Exception):
    """A section's one-line reason to fail."""


class SectionTimeout(Exception):
    """A command ran past its section's time (and what the section got done, if anything)."""


@dataclass
class Check:
    """One run of the check: its mode, files, clock and the environment of its commands."""

    dry_run: bool
    out: Path
    work: Path  # scratch files (the benchmarks' JSON, the test report), removed at the end
    log: TextIO
    budget_s: float
    name: str = "gpu_check"
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    deadline: float = 0.0  # time.monotonic() by which everything ends
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    env: dict[str, str] = field(default_factory=dict)
    section_deadline: float = 0.0
    commands: list[dict[str, Any]] = field(default_factory=list)  # of the running section

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget_s

    @property
    def mode(self) -> str:
        return "dry-run" if self.dry_run else "gpu"

    def say(self, line: str) -> None:
        """A progress line on stdout and in the log."""
        stamped = f"[{self.name} {datetime.now().strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        self.log.write(stamped + "\n")
        self.log.flush()

    def run(self, argv: Sequence[str], *, env: Optional[dict[str, str]] = None) -> int:
        """Run `argv` in the repository root, its output into the log, until the section's time
        is up (then its whole process group is stopped and SectionTimeout raised); its exit code."""
        remaining = self.section_deadline - time.monotonic()
        if remaining <= 0:
            raise SectionTimeout("no time left for its next command")
        self.log.write(f"\n$ {shlex.join(argv)}\n")
        self.log.flush()
        start = time.monotonic()
        # A process group of its own, to stop it whole; the same session, so that whoever ends the
        # check's session (the device tool at its time limit) ends it too.
        # SIGINT back to its default in the child: a check started in the background (`&`, nohup)
        # has it ignored, and the child would inherit that and not stop on `stop_process_group`'s SIGINT.
        process = subprocess.Popen(list(argv), cwd=REPO, env=self.env | (env or {}), stdin=subprocess.DEVNULL,
                                   stdout=self.log, stderr=subprocess.STDOUT,
                                   preexec_fn=_own_group_default_sigint)  # noqa: PLW1509 (one thread starts them)
        try:
            code = process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            stop_process_group(process)
            code = None
        finally:
            self.commands.append({"argv": list(argv), "returncode": process.returncode,
                                  "seconds": round(time.monotonic() - start, 1)})
            self.log.write(f"[exit {process.returncode} after {time.monotonic() - start:.1f} s]\n")
            self.log.flush()
        if code is None:
            raise SectionTimeout(f"{shlex.join(argv[:4])} ... ran out of the section's {remaining:.0f} s")
        return code


def _own_group_default_sigint() -> None:
    """In the child, before exec: a process group of its own, SIGINT at its default."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop the command's process group (DataLoader workers, compile workers too): SIGINT first,
    on which pytest still writes its report of the tests done, then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the sections -----------------------------------------------------------------------------

def run_setup(check: Check) -> dict[str, Any]:
    """Install .whl/ against requirements.txt, then probe the environment in a fresh process."""
    install = install_wheels(check)
    probe_file = check.work / "probe.json"
    code = check.run([sys.executable, "-m", "tools.gpu_check", "--probe", str(probe_file)])
    probe = json.loads(probe_file.read_text()) if code == 0 and probe_file.exists() else None
    result = {"install": install, "environment": (probe or {}).get("environment"),
              "requirements": (probe or {}).get("requirements"), "imports": (probe or {}).get("imports")}
    check.say(environment_line(result["environment"] or {}))
    problems = []
    if install["returncode"] not in (None, 0):
        problems.append("the wheels in .whl/ did not install (see the log)")
    if probe is None:
        problems.append(f"the environment probe exited {code}")
    else:
        unmet = [f"{name} {r['installed'] or 'missing'} (needs {r['required']})"
                 for name, r in probe["requirements"].items() if not r["ok"]]
        if unmet:
            problems.append("requirements.txt not met: " + ", ".join(unmet))
        broken = [f"{module} ({error})" for module, error in probe["imports"].items() if error]
        if broken:
            problems.append("cannot import " + "; ".join(broken))
        if not check.dry_run and not probe["environment"]["cuda_available"]:
            problems.append("torch sees no CUDA device")
    if problems:
        raise SectionFailed("; ".join(problems), result)
    return result


def install_wheels(check: Check) -> dict[str, Any]:
    """pip, offline, from .whl/ and what is installed: every requirement of requirements.txt that
    the machine does not meet comes from the wheels (a dry run only resolves). Where that fails (a
    requirement neither met nor carried), the wheels are installed without their dependencies;
    where that fails too (a read-only environment), into a folder put first on the commands'
    PYTHONPATH. The probe then says what is still amiss."""
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    install: dict[str, Any] = {"wheels": [w.name for w in wheels], "method": "none: no wheels in .whl/",
                               "returncode": None}
    if not wheels:
        return install
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input", "--root-user-action=ignore"]
    resolve_only = ["--dry-run"] if check.dry_run else []
    code = check.run([*pip, "--find-links", str(WHEELS), "-r", str(REQUIREMENTS), *resolve_only])
    install.update(method="pip --dry-run -r requirements.txt" if check.dry_run else "pip -r requirements.txt",
                   returncode=code)
    if code and not check.dry_run:
        code = check.run([*pip, "--no-deps", *map(str, wheels)])
        install.update(method="pip --no-deps (the install against requirements.txt failed)", returncode=code)
    if code and not check.dry_run:
        site = check.work / "site"
        code = check.run([*pip, "--no-deps", "--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)])
        install.update(method="pip --no-deps --target, first on PYTHONPATH (both installs into the environment failed)",
                       returncode=code)
        if code == 0:
            check.env["PYTHONPATH"] = os.pathsep.join([str(site), check.env["PYTHONPATH"]])
    return install


def run_cuda_tests(check: Check) -> dict[str, Any]:
    """pytest tests/cuda and the CUDA tests elsewhere (-k cuda), summarised from its JUnit report."""
    report = check.work / "cuda_tests.xml"
    try:
        code = check.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-n", "0",
                          "-o", "junit_family=xunit1", f"--junitxml={report}",
                          "tests/cuda", "tests/train/test_optim.py", "-k", "cuda"])
    except SectionTimeout as timeout:  # pytest, interrupted, reports the tests it finished
        raise SectionTimeout(str(timeout), junit_summary(report) if report.exists() else None) from None
    result = junit_summary(report) if report.exists() else None
    if code != 0:
        counts = "" if result is None else f": {result['failed']} failed, {result['error']} errors"
        raise SectionFailed(f"pytest exited {code}{counts}", result)
    no_cuda = [name for name, test in result["tests"].items()
               if test["outcome"] == "skipped" and "needs CUDA" in (test["message"] or "")]
    if no_cuda and not check.dry_run:
        raise SectionFailed(f"{len(no_cuda)} tests skipped for want of CUDA", result)
    return result


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and each test's outcome ("passed", "failed", "error", "skipped"), seconds, message and
    recorded properties, from pytest's JUnit XML report."""
    tests = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                lines = (node.get("message") or node.text or "").strip().splitlines()
                outcome, message = name, (lines[0][:300] if lines else "")
                break
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        module = (case.get("classname") or "").rsplit(".", 1)[-1]
        tests[f"{module}::{case.get('name')}"] = {"outcome": outcome, "seconds": float(case.get("time") or 0),
                                                  "message": message, "properties": properties}
    counts = {outcome: sum(t["outcome"] == outcome for t in tests.values())
              for outcome in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": tests}


def run_bench(check: Check, arguments: list[str], output: Path, *, compiles: bool) -> dict[str, Any]:
    """`python -m hnmix.bench ARGUMENTS --json OUTPUT`: its JSON."""
    # Inductor takes minutes on a 2-core CPU even for the tiny model: the dry run passes --compile
    # through, uncompiled.
    env = {"TORCH_COMPILE_DISABLE": "1"} if check.dry_run and compiles else None
    code = check.run([sys.executable, "-m", "hnmix.bench", *arguments, "--json", str(output)], env=env)
    if code != 0:
        raise SectionFailed(f"python -m hnmix.bench {arguments[0]} exited {code}")
    return json.loads(output.read_text())


def bench_section(name: str) -> Callable[[Check], dict[str, Any]]:
    """A section that runs `python -m hnmix.bench` with `bench_arguments(name)` and returns its JSON."""

    def run(check: Check) -> dict[str, Any]:
        arguments = bench_arguments(name, dry_run=check.dry_run, cores=check.cores)
        return run_bench(check, arguments, check.work / f"{name}.json", compiles="--compile" in arguments)

    return run


def run_overhead_section(check: Check) -> dict[str, Any]:
    """Each run of OVERHEAD_RUNS: {recipe: bench overhead's JSON, the rows of all its modes}. A run
    that fails does not stop the next; one out of time keeps what the others measured."""
    result: dict[str, Any] = {}
    failures = []
    for recipe, mode in OVERHEAD_RUNS:
        arguments = overhead_arguments(recipe, mode, dry_run=check.dry_run)
        output = check.work / f"overhead_{recipe}_{mode}.json"
        try:
            payload = run_bench(check, arguments, output, compiles=mode != "eager")
        except SectionFailed as failure:
            failures.append(f"{recipe} {mode}: {failure}")
            continue
        except SectionTimeout as timeout:
            raise SectionTimeout(f"{recipe} {mode}: {timeout}", result or None) from None
        if recipe in result:
            result[recipe]["rows"] += payload["rows"]
        else:
            result[recipe] = payload
    if failures:
        raise SectionFailed("; ".join(failures), result or None)
    return result


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # the most a GPU run gives it
    run: Callable[[Check], dict[str, Any]]


SECTIONS = (
    Section("setup", 90, run_setup),
    Section("cuda_tests", 240, run_cuda_tests),
    Section("bench_mixing", 60, bench_section("bench_mixing")),
    Section("bench_train_eager", 120, bench_section("bench_train_eager")),
    Section("overhead", 180, run_overhead_section),
    Section("bench_data", 90, bench_section("bench_data")),
    Section("bench_train_compile", 300, bench_section("bench_train_compile")),
)


def run_section(check: Check, section: Section) -> dict[str, Any]:
    """{status: passed|failed|timeout|skipped, seconds, error, commands, result} of one section."""
    start = time.monotonic()
    left = check.deadline - start
    limit = left if check.dry_run else min(section.cap_s, left)
    record: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "error": None, "commands": [], "result": None}
    if limit < MIN_SECTION_S:
        record["error"] = f"out of time: {left:.0f} s of --budget_s left"
        return record
    check.section_deadline, check.commands = start + limit, record["commands"]
    check.say(f"{section.name}: running (up to {limit:.0f} s)")
    check.log.write(f"\n===== {section.name} =====\n")
    try:
        record["result"] = section.run(check)
        record["status"] = "passed"
    except (SectionFailed, SectionTimeout) as stop:  # args: the reason, what the section got done
        record["status"] = "timeout" if isinstance(stop, SectionTimeout) else "failed"
        record["error"], record["result"] = str(stop.args[0]), stop.args[1] if len(stop.args) > 1 else None
    except Exception as error:  # noqa: BLE001 - a broken section must not cost the others their turn
        record["status"], record["error"] = "failed", f"{type(error).__name__}: {error}"
        check.log.write(traceback.format_exc())
    record["seconds"] = round(time.monotonic() - start, 1)
    check.say(f"{section.name}: {record['status']} in {record['seconds']:.0f} s"
              + (f" ({record['error']})" if record["error"] else ""))
    return record


# --- the environment (run in a fresh process after the install: --probe) ----------------------

def probe(path: Path) -> None:
    """Write {environment, requirements, imports} as JSON to `path`."""
    import platform

    import torch

    from hnmix.bench.system import _cpu_model

    cuda = torch.cuda.is_available()
    environment = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
        "cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "device_memory_mib": torch.cuda.get_device_properties(0).total_memory // (1 << 20) if cuda else None,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "driver": nvidia_driver(),
    }
    imports = {}
    for module in IMPORTS:
        try:
            __import__(module)
            imports[module] = None
        except Exception as error:  # noqa: BLE001 - reported, not raised
            imports[module] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    path.write_text(json.dumps({"environment": environment, "requirements": requirement_versions(REQUIREMENTS),
                                "imports": imports}, indent=2))


def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver's version (nvidia-smi, else /proc/driver/nvidia/version), or None."""
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    try:
        words = Path("/proc/driver/nvidia/version").read_text().split()
        return next(w for w in words if w[:1].isdigit() and "." in w)
    except (OSError, StopIteration):
        return None


def requirement_versions(path: Path) -> dict[str, dict[str, Any]]:
    """{name: {required, installed, ok}} for each line of a requirements file (markers honoured)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed: Optional[str] = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        ok = installed is not None and requirement.specifier.contains(installed, prereleases=True)
        found[requirement.name] = {"required": str(requirement.specifier) or "any", "installed": installed, "ok": ok}
    return found


def environment_line(environment: dict[str, Any]) -> str:
    """torch, CUDA, cuDNN, the card, the driver, Python and the cores, in one line."""
    def get(key: str) -> Any:
        return environment.get(key) or "?"

    card = (f"{get('device')} ({get('device_memory_mib')} MiB, sm {get('compute_capability')}), driver {get('driver')}"
            if environment.get("cuda_available") else "no CUDA device")
    return (f"torch {get('torch')} (CUDA {get('cuda')}, cuDNN {get('cudnn')}), {card}, "
            f"Python {get('python')}, {get('cores')} cores")


# --- targets and the table ----------------------------------------------------------------------

def result_of(sections: dict[str, dict[str, Any]], name: str) -> Optional[dict[str, Any]]:
    record = sections.get(name) or {}
    return record.get("result") if record.get("status") == "passed" else None


def target(text: str, value: Any, met: Callable[[Any], bool]) -> dict[str, Any]:
    return {"target": text, "value": value, "met": None if value is None else bool(met(value))}


def targets(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each {target, value, met}; value and met are None where not measured."""
    found: dict[str, dict[str, Any]] = {}
    for mode in ("eager", "compile"):
        train = result_of(sections, f"bench_train_{mode}")
        found[f"trainer_images_per_s_{mode}"] = target(
            f">= {TRAINER_IMAGES_PER_S} images/s", train and train["trainer_images_per_s"],
            lambda v: v >= TRAINER_IMAGES_PER_S)
        found[f"trainer_of_bare_loop_{mode}"] = target(
            f">= {OF_BARE_LOOP:.0%} of the bare loop", train and train["ratio_to_bare_loop"][FULL_TRAINER],
            lambda v: v >= OF_BARE_LOOP)
        found[f"mochi_over_moco_{mode}"] = target(
            f"<= {MOCHI_OVER_MOCO:.0%} over plain MoCo", train and train["mochi_cost_over_moco"],
            lambda v: v <= MOCHI_OVER_MOCO)
    mixing = result_of(sections, "bench_mixing")
    found["mixing_added_of_materialised"] = target(
        f"<= {MIXING_RATIO} of what materialising adds", mixing and mixing["ratio"], lambda v: v <= MIXING_RATIO)
    data = result_of(sections, "bench_data")
    found["workers_images_per_s_all_cores"] = target(
        f">= {TRAINER_IMAGES_PER_S} images/s (feeds the trainer)",
        data and data["images_per_s"][str(max(map(int, data["images_per_s"])))],
        lambda v: v >= TRAINER_IMAGES_PER_S)
    overhead = (sections.get("overhead") or {}).get("result") or {}  # a run cut short keeps the others
    for recipe in dict(OVERHEAD_RUNS):
        eager = next((r for r in overhead.get(recipe, {}).get("rows", []) if r["mode"] == "eager"), None)
        bound = None if eager is None else OPS_OF_BARE_ONE_SPLIT if eager["bn_splits"] == 1 else OPS_OF_BARE_SPLITS
        found[f"ops_of_bare_loop_{recipe}"] = target(
            f"<= {bound}x the bare loop's aten ops" if bound else
            f"<= {OPS_OF_BARE_ONE_SPLIT}x the bare loop's aten ops (bn_splits 1), {OPS_OF_BARE_SPLITS}x (more)",
            eager and eager["ratio"], lambda v, bound=bound: v <= bound)
    tests = ((sections.get("cuda_tests") or {}).get("result") or {}).get("tests", {})
    outcomes = [test["outcome"] for name, test in tests.items() if name.split("::")[-1] in SYNC_TESTS]
    no_sync = None if len(outcomes) < len(SYNC_TESTS) or "skipped" in outcomes else all(o == "passed" for o in outcomes)
    found["no_host_sync_in_step"] = target("no host synchronisation in the step", no_sync, lambda v: v)
    return found


Row = dict[str, str]


def row(section: str, what: str, value: str, *, of_ceiling: str = "", peak: str = "", goal: str = "",
        met: Optional[bool] = None) -> Row:
    return {"section": section, "what": what, "value": value, "of_ceiling": of_ceiling, "peak_gpu_memory": peak,
            "target": goal, "met": "" if met is None else ("yes" if met else "NO")}


def mib(value: Optional[float]) -> str:
    return "" if value is None else f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def table_rows(sections: dict[str, dict[str, Any]], goals: dict[str, dict[str, Any]]) -> list[Row]:
    """The short table: one to five rows a section, the issue's targets beside their numbers."""
    rows: list[Row] = []
    for name, record in sections.items():
        result = record.get("result")
        if record["status"] != "passed":
            rows.append(row(name, record["status"], record.get("error") or "", met=False))
        if result:  # what a section failing or out of time measured still shows
            rows.extend(ROW_BUILDERS[name](name, result, goals))
    return rows


def setup_rows(name: str, result: dict[str, Any], goals: dict) -> list[Row]:
    requirements = result.get("requirements") or {}
    unmet = [f"{n} {r['installed'] or 'missing'}" for n, r in requirements.items() if not r["ok"]]
    wheels = result["install"]["wheels"]
    return [row(name, "environment", environment_line(result.get("environment") or {})),
            row(name, f"requirements.txt ({len(wheels)} wheels from .whl/)", "unmet: " + ", ".join(unmet) if unmet else
                "all met", goal="all met", met=bool(requirements) and not unmet)]


def cuda_test_rows(name: str, result: dict[str, Any], goals: dict) -> list[Row]:
    counts = ", ".join(f"{result[o]} {o}" for o in ("passed", "failed", "error", "skipped") if result[o])
    rows = [row(name, "pytest tests/cuda (-k cuda)", counts, goal="all pass",
                met=not (result["failed"] or result["error"]))]
    for test, outcome in result["tests"].items():
        if outcome["outcome"] in ("failed", "error"):
            rows.append(row(name, test.split("::")[-1], f"{outcome['outcome']}: {outcome['message']}", met=False))
    no_sync = goals["no_host_sync_in_step"]
    rows.append(row(name, "no host synchronisation in the step (bf16, fp16)",
                    {True: "none", False: "SYNCHRONISES", None: "not measured"}[no_sync["value"]],
                    goal="none", met=no_sync["met"]))
    return rows


def mixing_rows(name: str, result: dict[str, Any], goals: dict) -> list[Row]:
    config, variants = result["config"], result["variants"]
    sizes = f"B={config['batch']} K={config['queue']} d={config['dim']} n_hard={config['n_hard']} " \
            f"s1={config['s1']} s2={config['s2']}"
    labels = {"moco": f"plain MoCo fwd+bwd, {sizes}", "hnmix": "MoCHi, hnmix (mix_logits)",
              "materialised": "MoCHi, materialising [B, s, d]"}
    moco_ms = variants["moco"]["ms_median"]
    rows = [row(name, labels[v], f"{r['ms_median']:.2f} ms", of_ceiling=f"{moco_ms / r['ms_median']:.0%}",
                peak=mib(r["peak_extra_mib"])) for v, r in variants.items()]
    goal = goals["mixing_added_of_materialised"]
    value = "n/a" if goal["value"] is None else f"{goal['value']:.2f}"
    rows.append(row(name, "time mixing adds / what materialising adds", value, goal=goal["target"], met=goal["met"]))
    return rows


def data_rows(name: str, result: dict[str, Any], goals: dict) -> list[Row]:
    most = str(max(map(int, result["images_per_s"])))
    floor = result["decode_only_images_per_s"]
    goal = goals["workers_images_per_s_all_cores"]
    photometric = result["batched_photometric"]
    return [
        row(name, f"JPEG decode alone, 1 core, {result['jpeg_size']}", f"{floor:.0f} images/s", of_ceiling="100%"),
        row(name, f"{most} workers: decode, crop, flip -> uint8", f"{result['images_per_s'][most]:.0f} images/s",
            of_ceiling=f"{result['per_core_of_decode_floor'][most]:.0%} per core", goal=goal["target"],
            met=goal["met"]),
        row(name, f"{most} workers: + photometric per image",
            f"{result['photometric_in_workers']['images_per_s'][most]:.0f} images/s",
            of_ceiling=f"{result['photometric_in_workers']['per_core_of_decode_floor'][most]:.0%} per core"),
        row(name, f"batched photometric, batch {photometric['batch_size']}, {photometric['device']}",
            f"{photometric['images_per_s']:.0f} images/s"),
    ]


def train_rows(name: str, result: dict[str, Any], goals: dict) -> list[Row]:
    mode = name.removeprefix("bench_train_")
    config = result["config"]
    rows = []
    for what, images_per_s in result["images_per_s"].items():
        compiled = f", compiled {config['compile_mode']}" if config["compile"] else ""
        label = what if what != BARE_LOOP else (f"{what}, {config['arch']} {config['img_size']}px "
                                                f"{config['mixed_precision']} batch {config['batch_size']}{compiled}")
        goal, met = "", None
        if what == FULL_TRAINER:
            speed, share = goals[f"trainer_images_per_s_{mode}"], goals[f"trainer_of_bare_loop_{mode}"]
            goal = f"{speed['target']}, {share['target']}"
            met = None if speed["met"] is None else bool(speed["met"] and share["met"])
        rows.append(row(name, label, f"{images_per_s:.1f} images/s",
                        of_ceiling=f"{result['ratio_to_bare_loop'][what]:.0%}",
                        peak=mib(result["peak_gpu_memory_mib"][what]), goal=goal, met=met))
    cost = goals[f"mochi_over_moco_{mode}"]
    rows.append(row(name, "MoCHi over plain MoCo (in-memory steps)", f"{result['mochi_cost_over_moco']:+.1%}",
                    goal=cost["target"], met=cost["met"]))
    return rows


def overhead_rows(name: str, result: dict[str, Any], goals: dict) -> list[Row]:
    """Per recipe, its bare loop, then the trainer's step in each mode: launches per step (CUDA
    launches on a GPU, the counting rule's aten ops elsewhere) and their ratio to the bare loop's, host
    ms, GPU busy ms, step ms, images/s; of its ceiling: images/s over the bare loop's."""
    rows = []
    for recipe, payload in result.items():
        config, measured = payload["config"], payload["rows"]
        first = measured[0]
        precision = config["mixed_precision"] if config["mixed_precision"] not in (None, "no") else "fp32"
        rows.append(row(name, f"{recipe} recipe: bare loop, {first['arch']} {config['img_size']}px {precision} "
                              f"batch {config['batch_size']}", per_step(first, "bare"), of_ceiling="100%"))
        for measured_row in measured:
            mode = measured_row["mode"] + (" (CUDA graphs)" if measured_row["mode"] == "reduce-overhead" else "")
            goal = goals[f"ops_of_bare_loop_{recipe}"] if measured_row["mode"] == "eager" else None
            rows.append(row(name, f"{recipe} recipe: trainer's step, bn_splits {measured_row['bn_splits']}, {mode}",
                            per_step(measured_row, "trainer"),
                            of_ceiling=f"{measured_row['trainer_images_per_s'] / measured_row['bare_images_per_s']:.0%}",
                            goal=goal["target"] if goal else "", met=goal["met"] if goal else None))
    return rows


def per_step(measured: dict[str, Any], who: str) -> str:
    """One `bench overhead` row's figures per step for `who` ("bare" or "trainer"), in one line."""
    launches = measured[f"{who}_cuda_launches"]
    count = f"{measured[who]:,.0f} aten ops" if launches is None else f"{launches:,.0f} CUDA launches"
    if who == "trainer":
        ratio = measured["ratio"] if launches is None else launches / measured["bare_cuda_launches"]
        count += f" ({ratio:.2f}x the bare loop's" + ("" if launches is None else f", aten ops {measured['ratio']:.2f}x") + ")"
    busy = measured[f"{who}_gpu_busy_ms"]
    return ", ".join([count, f"host {measured[f'{who}_host_ms']:.2f} ms",
                      *([f"GPU busy {busy:.2f} ms"] if busy is not None else []),
                      f"step {measured[f'{who}_step_ms']:.2f} ms", f"{measured[f'{who}_images_per_s']:,.0f} images/s"])


ROW_BUILDERS: dict[str, Callable[[str, dict, dict], list[Row]]] = {
    "setup": setup_rows, "cuda_tests": cuda_test_rows, "bench_mixing": mixing_rows, "bench_data": data_rows,
    "bench_train_eager": train_rows, "bench_train_compile": train_rows, "overhead": overhead_rows,
}
COLUMNS = {"section": "section", "what": "what", "value": "value", "of_ceiling": "of its ceiling",
           "peak_gpu_memory": "peak GPU memory", "target": "target", "met": "met"}


def markdown(report: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md, headed by card, driver, torch, CUDA and date."""
    env = report["environment"]
    head = (f"### GPU check, {report['started_at'][:10]}: {env.get('device') or 'no GPU'}, driver {env.get('driver')}, "
            f"torch {env.get('torch')} (CUDA {env.get('cuda')}), {env.get('cores')} cores\n\n"
            f"`launch/gpu_check.sh{' --dry-run' if report['mode'] == 'dry-run' else ''}` ({report['mode']}, "
            f"{report['wall_s']:.0f} s, commit {report['commit'] or 'unknown'}); every section: "
            + ", ".join(f"{n} {s['status']}" for n, s in report["sections"].items()) + ".\n"
            "Of its ceiling: a training or overhead row's images/s over the bare loop's, plain MoCo's time over a "
            "mixing row's, a worker row's images/s per core over the one-core decode's. Overhead rows: per step, "
            "CUDA launches on a GPU (aten ops, bench overhead's counting rule, elsewhere), the host's time to issue "
            "it, the GPU's busy time, its time back to back.\n\n")
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["table"]:
        lines.append("| " + " | ".join(r[key].replace("|", "/") for key in COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"


# --- the run ------------------------------------------------------------------------------------

def git_commit() -> Optional[str]:
    """HEAD of the repository, with "+changes" when the tree differs; None without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def report_of(check: Check, sections: dict[str, dict[str, Any]], *, argv: Sequence[str],
              selected: Sequence[str]) -> dict[str, Any]:
    """Everything gpu_check.json holds; the same keys in both modes and at every stage."""
    environment = ((sections["setup"].get("result") or {}).get("environment")) or {}
    goals = targets(sections)
    ok = all(sections[name]["status"] == "passed" for name in selected)
    now = datetime.now(timezone.utc)
    return {
        "mode": check.mode, "ok": ok, "exit_code": 0 if ok else 1,
        "started_at": check.started.isoformat(timespec="seconds"), "finished_at": now.isoformat(timespec="seconds"),
        "wall_s": round((now - check.started).total_seconds(), 1), "budget_s": check.budget_s,
        "command": list(argv), "commit": git_commit(), "out_dir": str(check.out), "sections_selected": list(selected),
        "environment": {key: environment.get(key) for key in ENVIRONMENT_KEYS},
        "sections": sections, "targets": goals,
        "table": table_rows({n: s for n, s in sections.items() if s["status"] != "pending"}, goals),
    }


def command_environment(work: Path, *, dry_run: bool) -> dict[str, str]:
    """The environment of the check's commands: hnmix importable, no Hub, a Hugging Face cache in
    `work`; a dry run hides CUDA."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home")}
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def add_run_arguments(parser: argparse.ArgumentParser, budgets: dict[str, float], *, dry_run: str) -> None:
    """OUT, --dry-run and --budget_s, which every GPU check takes."""
    parser.add_argument("out", nargs="?", type=Path, default=None, help="output directory (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--budget_s", type=float, default=None,
                        help=f"seconds for everything (default: {budgets['gpu']}, dry run {budgets['dry-run']})")


@contextmanager
def started_check(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
                  budgets: dict[str, float], usage: str) -> Iterator[Check]:
    """The GPU check `name` under way: OUT (args.out, else $OUT) made, NAME.log open in it, the
    commands' environment set, a scratch folder that is removed at the end."""
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        parser.error(f"give the output directory ({usage}) or set OUT")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"hnmix-{name.replace('_', '-')}-"))
    budget_s = args.budget_s or budgets["dry-run" if args.dry_run else "gpu"]
    try:
        with open(out / f"{name}.log", "w") as log:
            yield Check(dry_run=args.dry_run, out=out, work=work, log=log, budget_s=budget_s, name=name,
                        env=command_environment(work, dry_run=args.dry_run))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, BUDGET_S, dry_run="every section on the CPU at tiny sizes")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated, of {', '.join(s.name for s in SECTIONS[1:])} (setup always runs)")
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def selected_sections(text: Optional[str], parser: argparse.ArgumentParser) -> list[str]:
    names = [s.name for s in SECTIONS]
    if text is None:
        return names
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(names[1:])}")
    return [name for name in names if name == "setup" or name in wanted]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe is not None:
        probe(args.probe)
        return 0
    selected = selected_sections(args.sections, parser)
    with started_check("gpu_check", args, parser, BUDGET_S, "launch/gpu_check.sh DIR") as check:
        out = check.out
        check.say(f"{check.mode}, {check.budget_s:.0f} s at most, sections {', '.join(selected)}; writing to {out}")
        sections = {s.name: {"status": "pending", "seconds": 0.0, "error": None, "commands": [], "result": None}
                    for s in SECTIONS}
        for section in SECTIONS:
            if section.name in selected:
                sections[section.name] = run_section(check, section)
            else:
                sections[section.name] = sections[section.name] | {"status": "skipped", "error": "not selected"}
            report = report_of(check, sections, argv=argv, selected=selected)
            (out / JSON_FILE).write_text(json.dumps(report, indent=2) + "\n")
        table = markdown(report)
        (out / TABLE_FILE).write_text(table)
        print("\n" + table, flush=True)
        verdict = "every section passed" if report["ok"] else "some sections did not pass"
        check.say(f"{verdict} in {report['wall_s']:.0f} s; {out / JSON_FILE}, {out / LOG_FILE}, {out / TABLE_FILE}")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
