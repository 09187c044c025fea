"""hnmix.references (published results as data) and their overlay by `python -m hnmix.plot --reference`."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from hnmix.errors import ConfigError
from hnmix.pictures.curves import (
    CURVES_PIXELS,
    Run,
    curves_figure,
    reference_overlay,
    reference_points,
)
from hnmix.plot import load_runs
from hnmix.plot import main as plot_main
from hnmix.references import known_references, load_reference

DEMO = "moco_cifar10_demo"
# Read off the notebook's log ("Test Epoch: [N/200] Acc@1:XX.XX%") by hand, independently of the YAML.
DEMO_LOG = {1: 31.98, 2: 33.52, 3: 34.71, 4: 36.98, 5: 37.95, 10: 48.03, 15: 54.84, 20: 61.38, 30: 67.05,
            40: 71.32, 50: 73.30, 75: 75.93, 100: 78.06, 150: 81.18, 200: 82.58}


def write_epochs(directory, *, steps_per_epoch=16, epochs=3, knn=(33.0, 35.5, 38.2)):
    """A run's dir_out with a record per step for `epochs` epochs and a kNN at the end of each."""
    directory.mkdir(parents=True)
    records = []
    for step in range(1, steps_per_epoch * epochs + 1):
        record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": 8.0 - step / 100, "lr": 0.06}
        if step % steps_per_epoch == 0 and knn:
            record |= {"knn_top1": knn[step // steps_per_epoch - 1], "knn_top5": 80.0}
        records.append(record)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "config.yaml").write_text(yaml.safe_dump({"arch": "resnet18", "dataset": "cifar10", "s1_hard": 0}))
    return directory


def reference_lines(figure):
    return [line for line in figure.axes[2].get_lines() if "published" in str(line.get_label())]


def test_the_demo_reference_holds_the_notebooks_log_and_its_sources():
    assert DEMO in known_references()
    demo = load_reference(DEMO)
    assert sorted(demo.knn_top1_by_epoch) == list(range(1, 201))  # every epoch of the log
    assert {epoch: demo.knn_top1_by_epoch[epoch] for epoch in DEMO_LOG} == DEMO_LOG
    assert demo.source["repository"] == "facebookresearch/moco" and demo.source["branch"] == "colab-notebook"
    assert demo.source["file"] == "colab/moco_cifar10_demo.ipynb" and demo.source["url"].startswith("https://")
    assert demo.train_images == 50_000 and demo.recipe["batch_size"] == 512 and demo.recipe["queue"] == 4096
    # 97 steps of 512 in about 20.4 s (the log's bars show 00:20, tqdm's whole seconds: 20-21 s).
    assert 97 * 512 / 21 <= demo.images_per_s <= 97 * 512 / 20
    values = {(r["metric"], r["epochs"], r.get("loss")): r["value"] for r in demo.other_results}
    assert [values["kNN top-1 (%)", epochs, "asymmetric"] for epochs in (200, 400, 800)] == [82.6, 86.3, 88.7]
    assert [values["kNN top-1 (%)", epochs, "symmetric"] for epochs in (200, 400, 800)] == [85.3, 88.5, 89.7]
    assert values["linear top-1 (%)", 800, "symmetric"] == 90.7
    (lightly,) = [r for r in demo.other_results if "lightly" in r["source"]]
    assert (lightly["value"], lightly["epochs"], lightly["minutes"], lightly["hardware"]) == (
        84.7, 200, 112.2, "one NVIDIA RTX A6000")


def test_the_reference_files_are_package_data():
    """An installed hnmix (a wheel, not this checkout) has the YAML files too."""
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"hnmix.references" = ["*.yaml"]' in package_data


def test_an_unknown_reference_names_the_known_ones():
    with pytest.raises(ConfigError, match=f"unknown reference 'nope'; known: .*{DEMO}"):
        load_reference("nope")


def test_published_epoch_n_sits_at_the_end_of_the_runs_nth_epoch_and_stops_one_point_past_the_run():
    published = {1: 30.0, 2: 40.0, 3: 50.0, 4: 60.0, 5: 70.0}
    # 97 steps per epoch, run at step 250 (in its 3rd epoch): epochs 1, 2, then 3 as the next point.
    assert reference_points(published, 97, 250) == [(97, 30.0), (194, 40.0), (291, 50.0)]
    # A run that ended exactly at an epoch's end covers that point; the next one follows.
    assert reference_points(published, 16, 48) == [(16, 30.0), (32, 40.0), (48, 50.0), (64, 60.0)]
    assert reference_points(published, 12.5, 1000) == [(12.5, 30.0), (25.0, 40.0), (37.5, 50.0), (50.0, 60.0),
                                                       (62.5, 70.0)]  # the whole curve when the run is longer
    assert reference_points({2: 40.0, 1: 30.0}, 10, 5) == [(10, 30.0)]  # epoch order, whatever the mapping's


def test_the_overlay_is_placed_by_the_first_run_up_to_the_furthest_run(tmp_path):
    demo = load_reference(DEMO)
    first = write_epochs(tmp_path / "first", steps_per_epoch=16, epochs=2)
    longer = write_epochs(tmp_path / "longer", steps_per_epoch=10, epochs=5, knn=None)  # last step 50
    runs = load_runs([str(first), str(longer)])
    assert [step for step, _ in reference_overlay(runs, demo)] == [16, 32, 48, 64]  # 64 > 50: the next point


def test_plot_with_a_reference_overlays_the_published_curve_on_the_knn_panel(tmp_path, capsys):
    run = write_epochs(tmp_path / "run", steps_per_epoch=16, epochs=3)
    out = tmp_path / "with_reference.png"
    assert plot_main([str(run), "--reference", DEMO, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    with Image.open(out) as image:
        assert image.size == CURVES_PIXELS

    demo = load_reference(DEMO)
    figure = curves_figure(load_runs([str(run)]), demo)
    (line,) = reference_lines(figure)
    assert list(line.get_xdata()) == [16, 32, 48, 64]  # the end of each of the run's 3 epochs, then epoch 4
    assert list(line.get_ydata()) == [31.98, 33.52, 34.71, 36.98]
    assert line.get_label() == f"{demo.title}, top-1" and line.get_color() == "black"
    assert line.get_label() in [text.get_text() for text in figure.axes[2].get_legend().get_texts()]
    assert not reference_lines(curves_figure(load_runs([str(run)])))  # only when asked for


def test_a_reference_is_drawn_on_a_run_without_knn_which_still_says_so(tmp_path):
    records = load_runs([str(write_epochs(tmp_path / "run", epochs=2, knn=None))])[0].records
    figure = curves_figure([Run("run", records, {})], load_reference(DEMO))
    (line,) = reference_lines(figure)
    assert list(line.get_xdata()) == [16, 32, 48]
    assert any("no kNN evaluation" in text.get_text() for text in figure.axes[2].texts)


def test_plot_refuses_an_unknown_reference_before_reading_the_runs(tmp_path, capsys):
    assert plot_main([str(tmp_path / "no_such_run"), "--reference", "nope"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hnmix: error: unknown reference 'nope'") and DEMO in error and error.count("\n") == 1


def test_plot_refuses_a_reference_for_a_run_that_has_not_finished_an_epoch(tmp_path, capsys):
    run = tmp_path / "young"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 0, "loss": 8.0}) + "\n"
                                               for s in (2, 4, 6)))
    assert plot_main([str(run), "--reference", DEMO, "--out", str(tmp_path / "young.png")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hnmix: error: run 'young' has not finished an epoch") and error.count("\n") == 1
    assert not (tmp_path / "young.png").exists()
    assert plot_main([str(run), "--out", str(tmp_path / "young.png")]) == 0  # without --reference it draws
