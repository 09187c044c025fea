"""The GPU check (launch/gpu_check.sh, tools/gpu_check.py) cannot rot: its dry run runs
every section on the CPU and writes gpu_check.json with every key; a section that fails or runs
out of time is recorded and the next one runs; the test report and the requirement check it
relies on read what they should."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from launch import REPO
from tools import gpu_check
from tools.gpu_check import (
    ENVIRONMENT_KEYS,
    SECTIONS,
    SYNC_TESTS,
    Check,
    Section,
    bench_section,
    junit_summary,
    power_of_two_workers,
    requirement_versions,
    run_section,
)

TOP_KEYS = {"mode", "ok", "exit_code", "started_at", "finished_at", "wall_s", "budget_s", "command", "commit",
            "out_dir", "sections_selected", "environment", "sections", "targets", "table"}
SECTION_KEYS = {"status", "seconds", "error", "commands", "result"}
TARGETS = {"trainer_images_per_s_eager", "trainer_of_bare_loop_eager", "mochi_over_moco_eager",
           "trainer_images_per_s_compile", "trainer_of_bare_loop_compile", "mochi_over_moco_compile",
           "mixing_added_of_materialised", "workers_images_per_s_all_cores", "no_host_sync_in_step",
           "ops_of_bare_loop_cifar10", "ops_of_bare_loop_imagenet"}
TABLE_KEYS = {"section", "what", "value", "of_ceiling", "peak_gpu_memory", "target", "met"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """launch/gpu_check.sh --dry-run OUT, as CI and a developer run it: (completed process, OUT)."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(["bash", str(REPO / "launch/gpu_check.sh"), "--dry-run", str(out)], cwd=REPO,
                          env=os.environ | {"PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    return done, out


def test_dry_run_runs_every_section_and_writes_every_key(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report) == TOP_KEYS
    assert report["mode"] == "dry-run" and report["ok"] and report["exit_code"] == 0
    assert list(report["sections"]) == [s.name for s in SECTIONS] == report["sections_selected"]
    for name, section in report["sections"].items():
        assert set(section) == SECTION_KEYS
        assert section["status"] == "passed", (name, section["error"])
        assert section["commands"] and all(c["returncode"] == 0 for c in section["commands"]), name
        assert section["result"], name
    assert set(report["environment"]) == set(ENVIRONMENT_KEYS) and report["environment"]["torch"]
    assert set(report["targets"]) == TARGETS
    for name, goal in report["targets"].items():
        assert set(goal) == {"target", "value", "met"}, name
    assert report["targets"]["no_host_sync_in_step"]["value"] is None  # skipped without CUDA: not measured
    for recipe, bound in (("cifar10", 2.5), ("imagenet", 1.5)):  # the recipe's bn_splits picks the bound: 8, 1
        goal = report["targets"][f"ops_of_bare_loop_{recipe}"]
        assert goal["target"] == f"<= {bound}x the bare loop's aten ops" and goal["value"] > 1, goal
    assert {row["section"] for row in report["table"]} == set(report["sections"])
    assert all(set(row) == TABLE_KEYS for row in report["table"])


def test_dry_run_sections_hold_what_the_table_and_targets_read(dry_run):
    _, out = dry_run
    results = {name: s["result"] for name, s in json.loads((out / "gpu_check.json").read_text())["sections"].items()}
    setup = results["setup"]
    assert all(r["ok"] for r in setup["requirements"].values()) and "datasets" in setup["requirements"]
    assert set(setup["imports"]) == set(gpu_check.IMPORTS) and not any(setup["imports"].values())
    tests = results["cuda_tests"]
    assert tests["skipped"] == len(tests["tests"]) >= 20 and tests["passed"] == tests["failed"] == 0
    collected = {name.split("::")[-1] for name in tests["tests"]}
    assert set(SYNC_TESTS) <= collected  # the sync-free tests are found, the guard's in tests/train included
    assert set(results["bench_mixing"]["variants"]) == {"moco", "hnmix", "materialised"}
    assert results["bench_mixing"]["config"]["device"] == "cpu"
    for name, compiled in (("bench_train_eager", False), ("bench_train_compile", True)):
        train = results[name]
        assert train["config"]["compile"] is compiled and train["config"]["mixed_precision"] == "bf16"
        assert train["config"]["compile_mode"] == ("reduce-overhead" if compiled else "default")  # CUDA graphs
        assert len(train["images_per_s"]) == 4 and all(v > 0 for v in train["images_per_s"].values())
        assert set(train["peak_gpu_memory_bytes"]) == set(train["images_per_s"])
        assert all(v is None for v in train["peak_gpu_memory_bytes"].values())  # no GPU here
    overhead = results["overhead"]
    assert {recipe: [r["mode"] for r in payload["rows"]] for recipe, payload in overhead.items()} == {
        "cifar10": ["eager", "reduce-overhead"], "imagenet": ["eager"]}  # graphs for the CIFAR recipe only
    cifar10, imagenet = overhead["cifar10"]["config"], overhead["imagenet"]["config"]
    assert (cifar10["bn_splits"], cifar10["mixed_precision"]) == (8, None)  # the recipes' own values stand
    assert (imagenet["bn_splits"], imagenet["mixed_precision"]) == (1, "bf16")
    for payload in overhead.values():
        for measured in payload["rows"]:
            assert measured["bare"] > 0 and measured["trainer"] > measured["bare"]
            for who in ("bare", "trainer"):
                assert measured[f"{who}_host_ms"] > 0 and measured[f"{who}_step_ms"] > 0
                assert measured[f"{who}_images_per_s"] > 0
                assert measured[f"{who}_cuda_launches"] is None and measured[f"{who}_gpu_busy_ms"] is None  # no GPU
    data = results["bench_data"]
    assert set(data["images_per_s"]) == {str(w) for w in power_of_two_workers(os.cpu_count() or 1)}
    assert set(data["per_core_of_decode_floor"]) == set(data["images_per_s"])
    assert data["batched_photometric"]["batch_size"] == 8


def test_dry_run_prints_the_table_and_logs_every_command(dry_run):
    done, out = dry_run
    assert "| section | what | value |" in done.stdout and "every section passed" in done.stdout
    log = (out / "gpu_check.log").read_text()
    for section in SECTIONS:
        assert f"===== {section.name} =====" in log
    assert "-m hnmix.bench train" in log and "--compile" in log and "-m pytest" in log
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("### GPU check, ") and "| section | what | value |" in table
    assert "bench_train_compile | full trainer (data pipeline)" in table
    assert "bf16 batch 8, compiled reduce-overhead |" in table
    assert "-m hnmix.bench overhead --config configs/mochi_cifar10.yaml --modes reduce-overhead" in log
    assert "| overhead | cifar10 recipe: bare loop, test_resnet 32px fp32 batch 8 | " in table
    assert "| overhead | imagenet recipe: bare loop, test_resnet 32px bf16 batch 8 | " in table
    assert "| overhead | cifar10 recipe: trainer's step, bn_splits 8, reduce-overhead (CUDA graphs) | " in table
    eager = next(line for line in table.splitlines() if "imagenet recipe: trainer's step, bn_splits 1, eager" in line)
    assert re.search(r"\| [\d,]+ aten ops \(\d+\.\d\dx the bare loop's\), host [\d.]+ ms, step [\d.]+ ms, "
                     r"[\d,]+ images/s \| \d+% \|  \| <= 1.5x the bare loop's aten ops \| (yes|NO) \|$", eager), eager


def test_a_failing_section_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch, capsys):
    """bench data given a worker count it refuses: that section fails with its exit code, bench
    mixing after it passes, the sections not selected are marked so, and the exit code is 1."""
    real_arguments = gpu_check.bench_arguments

    def arguments(name, **kwargs):
        if name == "bench_data":
            return ["data", "--workers", "0"]
        return real_arguments(name, **kwargs)

    monkeypatch.setattr(gpu_check, "bench_arguments", arguments)
    monkeypatch.setattr(gpu_check, "SECTIONS", tuple(s for s in SECTIONS if s.name != "bench_mixing")
                        + tuple(s for s in SECTIONS if s.name == "bench_mixing"))  # mixing after data
    code = gpu_check.main(["--dry-run", str(tmp_path), "--sections", "bench_data,bench_mixing"])
    assert code == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert sections["bench_data"]["status"] == "failed"
    assert sections["bench_data"]["error"] == "python -m hnmix.bench data exited 2"
    assert sections["bench_mixing"]["status"] == "passed" and sections["setup"]["status"] == "passed"
    assert {sections[n]["status"] for n in ("cuda_tests", "bench_train_eager", "overhead", "bench_train_compile")} \
        == {"skipped"}
    assert not report["ok"] and report["exit_code"] == 1
    assert {"section": "bench_data", "what": "failed"}.items() <= next(
        r for r in report["table"] if r["section"] == "bench_data").items()
    assert "some sections did not pass" in capsys.readouterr().out


def test_a_section_past_its_time_is_stopped_and_recorded_as_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_SECTION_S", 0)
    env = os.environ | {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    with open(tmp_path / "log", "w") as log:
        check = Check(dry_run=True, out=tmp_path, work=tmp_path, log=log, budget_s=1.0, env=env)
        record = run_section(check, Section("bench_mixing", 60, bench_section("bench_mixing")))
    assert record["status"] == "timeout" and "ran out of the section's" in record["error"]
    assert record["result"] is None and record["commands"][0]["returncode"] < 0  # stopped by a signal
    with open(tmp_path / "log", "w") as log:
        check = Check(dry_run=True, out=tmp_path, work=tmp_path, log=log, budget_s=1.0, env=env)
        check.deadline = time.monotonic() - 1
        assert run_section(check, SECTIONS[2])["error"].startswith("out of time")


def overhead_row(mode: str, trainer_launches: float) -> dict:
    """A row as `bench overhead` writes it on a GPU (hnmix.bench.overhead.count_row)."""
    figures = {"bare": 300.0, "trainer": 750.0, "ratio": 2.5, "bare_cuda_launches": 320.0,
               "trainer_cuda_launches": trainer_launches, "bare_gpu_busy_ms": 2.0, "trainer_gpu_busy_ms": 2.5,
               "bare_host_ms": 1.5, "trainer_host_ms": 4.0, "bare_step_ms": 2.1, "trainer_step_ms": 4.2,
               "bare_images_per_s": 240_000.0, "trainer_images_per_s": 120_000.0}
    return {"arch": "resnet18", "bn_splits": 8, "mode": mode, **figures}


def test_overhead_rows_on_a_gpu_count_cuda_launches_and_a_cut_run_keeps_what_it_measured():
    """On a GPU an overhead row shows CUDA launches with their ratio to the bare loop's (the aten
    ops' beside it) and the GPU's busy time; a section out of time during the compiled run shows
    its status, then the eager rows its runs measured, their target read."""
    config = {"img_size": 32, "batch_size": 512, "mixed_precision": "no"}
    sections = {"overhead": {"status": "timeout", "error": "cifar10 reduce-overhead: ran out", "commands": [],
                             "seconds": 180.0, "result": {"cifar10": {"config": config,
                                                                      "rows": [overhead_row("eager", 960.0)]}}}}
    goals = gpu_check.targets(sections)
    assert goals["ops_of_bare_loop_cifar10"] == {"target": "<= 2.5x the bare loop's aten ops", "value": 2.5,
                                                 "met": True}
    assert goals["ops_of_bare_loop_imagenet"]["value"] is None  # not reached
    rows = gpu_check.table_rows(sections, goals)
    assert [(r["what"], r["value"]) for r in rows] == [
        ("timeout", "cifar10 reduce-overhead: ran out"),
        ("cifar10 recipe: bare loop, resnet18 32px fp32 batch 512",
         "320 CUDA launches, host 1.50 ms, GPU busy 2.00 ms, step 2.10 ms, 240,000 images/s"),
        ("cifar10 recipe: trainer's step, bn_splits 8, eager",
         "960 CUDA launches (3.00x the bare loop's, aten ops 2.50x), host 4.00 ms, GPU busy 2.50 ms, step 4.20 ms, "
         "120,000 images/s"),
    ]
    assert (rows[2]["of_ceiling"], rows[2]["met"]) == ("50%", "yes")
    graphs = gpu_check.overhead_rows("overhead", {"cifar10": {"config": config,
                                                              "rows": [overhead_row("reduce-overhead", 32.0)]}}, goals)
    assert graphs[1]["what"].endswith("reduce-overhead (CUDA graphs)") and graphs[1]["target"] == ""
    assert graphs[1]["value"].startswith("32 CUDA launches (0.10x the bare loop's")


def test_junit_summary_reads_outcomes_messages_and_properties(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        def test_passes(record_property):
            record_property("bitwise_identical", True)

        def test_fails():
            assert 1 == 2, "one is not two"

        @pytest.mark.skip(reason="needs CUDA")
        def test_skipped():
            pass
    """))
    report = tmp_path / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={report}", str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True,
                   timeout=120, check=False)
    summary = junit_summary(report)
    assert (summary["passed"], summary["failed"], summary["error"], summary["skipped"]) == (1, 1, 0, 1)
    tests = summary["tests"]
    assert tests["test_sample::test_passes"]["properties"] == {"bitwise_identical": "True"}
    assert "one is not two" in tests["test_sample::test_fails"]["message"]
    assert tests["test_sample::test_skipped"]["message"] == "needs CUDA"


def test_the_row_names_the_check_reads_are_those_bench_train_writes():
    from hnmix.bench import train

    assert (gpu_check.BARE_LOOP, gpu_check.FULL_TRAINER) == (train.BARE_LOOP, train.FULL_TRAINER)


def test_requirement_versions_compare_installed_versions_with_the_specifiers(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# a comment\npytest>=8\nrich<1  # older than any rich there is\n"
                            "no-such-package-hnmix>=1\ntorch>=2.4; python_version < '3'\n")
    found = requirement_versions(requirements)
    assert found["pytest"]["ok"] is True and found["pytest"]["required"] == ">=8"
    assert found["rich"]["ok"] is False and found["rich"]["installed"]
    assert found["no-such-package-hnmix"] == {"required": ">=1", "installed": None, "ok": False}
    assert "torch" not in found  # its marker does not hold
    assert requirement_versions(REPO / "requirements.txt")["pytest"]["ok"]
