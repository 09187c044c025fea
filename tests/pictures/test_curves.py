"""hnmix.pictures.curves and python -m hnmix.plot: the training curves of one run or several."""

import json

import yaml
from PIL import Image
from tiny_run import TINY, metrics, run_train

from hnmix.pictures.curves import (
    CURVES_PIXELS,
    curves_figure,
    load_run,
    read_records,
    steps_per_epoch_of,
)
from hnmix.plot import load_runs
from hnmix.plot import main as plot_main


def write_run(directory, *, s1, lr_base, steps=(10, 20, 30, 40)):
    directory.mkdir(parents=True)
    records = [{"step": step, "epoch": (step - 1) // 16, "loss": 8.0 - step / 10, "lr": lr_base, "acc1": step / 100,
                "images_per_s": 100.0, "logit_pos": 5.0, "logit_hardest": 7.0, "hard_false_negative": 0.1,
                **({"logit_type1": 6.0, "synthetic_above_pos": 0.2} if s1 else {})} for step in steps]
    records[-1] |= {"knn_top1": 30.0, "knn_top5": 60.0}
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"arch": "resnet18", "dataset": "synthetic", "steps": 40, "n_hard": 32, "s1_hard": s1, "s2_hard": 0,
              "lr_base": lr_base, "dir_out": str(directory)}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def loss_lines(figure):
    return [line for line in figure.axes[0].get_lines() if line.get_label() == "loss"]


def test_plot_overlays_two_runs_with_a_legend_from_their_configs(tmp_path):
    moco = write_run(tmp_path / "moco", s1=0, lr_base=1e-3)
    mochi = write_run(tmp_path / "mochi", s1=16, lr_base=2e-3)
    out = tmp_path / "both.png"
    assert plot_main([str(moco), str(mochi), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == CURVES_PIXELS

    figure = curves_figure(load_runs([str(moco), str(mochi)]))
    assert len(loss_lines(figure)) == 2
    assert len({line.get_color() for line in loss_lines(figure)}) == 2  # a colour per run
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "moco: MoCo, lr_base=0.001", "mochi: MoCHi (N=32, s1=16, s2=0), lr_base=0.002"]  # dir_out left out
    type1 = [line for line in figure.axes[3].get_lines() if line.get_label() == "type-1 synthetic"]
    assert len(type1) == 1  # only the MoCHi run has type-1 logits


def test_plot_refuses_a_folder_without_metrics_in_one_line(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hnmix: error:") and "metrics.jsonl" in error and error.count("\n") == 1
    write_run(tmp_path / "run", s1=0, lr_base=1e-3)
    assert plot_main([str(tmp_path / "run"), "--out", str(tmp_path / "curves.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


def test_records_are_one_per_step_in_order_and_epochs_are_estimated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4, "epoch": 1, "loss": 2}\n{"step": 2, "epoch": 0, "loss": 3}\n'
                    '{"step": 4, "epoch": 1, "knn_top1": 50}\n{"step": 6, "ep')  # a half-written last line
    assert read_records(path) == [{"step": 2, "epoch": 0, "loss": 3}, {"step": 4, "epoch": 1, "loss": 2, "knn_top1": 50}]
    # 3 steps per epoch: steps 1-3 are epoch 0, 4-6 epoch 1.
    assert 3 <= steps_per_epoch_of([{"step": s, "epoch": (s - 1) // 3} for s in range(1, 10)]) < 4


def test_a_resumed_runs_curve_is_one_line_and_the_encoder_carries_it(tmp_path):
    out = tmp_path / "out"
    common = [*TINY, "-s", "8", "-sp", "2", "-ss", "3", "--eval_every", "4", "--num_workers", "0", "-do", str(out)]
    first = run_train(*common, "--stop_at", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "curves.png").is_file()  # drawn at the checkpoints already
    second = run_train(*common, "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]

    steps = [r["step"] for r in metrics(out)]
    assert steps == [2, 4, 6, 8]
    figure = curves_figure([load_run(out)])
    (loss,) = loss_lines(figure)
    assert list(loss.get_xdata()) == steps  # no gap, no step twice
    knn_steps = [list(line.get_xdata()) for line in figure.axes[2].get_lines() if line.get_label() == "top-1"]
    assert knn_steps == [[4, 8]]
    for path in (out / "curves.png", out / "encoder/curves.png"):
        with Image.open(path) as image:
            assert image.size == CURVES_PIXELS
    assert (out / "encoder/curves.png").read_bytes() == (out / "curves.png").read_bytes()
    assert "](curves.png)" in (out / "encoder/README.md").read_text()


def test_the_recorded_steps_per_epoch_win_over_the_estimate():
    """Records one epoch apart (steps_print = steps per epoch) leave the estimate between 97 and 193."""
    records = [{"step": 97, "epoch": 0, "steps_per_epoch": 97}, {"step": 194, "epoch": 1, "steps_per_epoch": 97}]
    assert steps_per_epoch_of(records) == 97


def test_the_knn_panel_names_the_split_its_records_classified():
    from hnmix.pictures.curves import PANELS, Run, _panel_title

    knn_panel = next(panel for panel in PANELS if panel.series[0].key == "knn_top1")
    run = Run("r", [{"step": 5, "epoch": 0, "knn_top1": 50.0, "knn_split": "test"}], {})
    assert _panel_title(knn_panel, [run]) == "kNN accuracy on the test split"
    assert _panel_title(knn_panel, [Run("old", [{"step": 5, "epoch": 0, "knn_top1": 50.0}], {})]) == knn_panel.title
