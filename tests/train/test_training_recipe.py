"""hnmix.train with the paper's recipe options: every optimizer, the lr convention, the momentum
schedule, symmetric views, and a curriculum that cannot silently switch off."""

import math

import pytest
from huggingface_hub import ModelCard
from tiny_run import TINY, losses, metrics, run_train

from hnmix.errors import ConfigError
from hnmix.train.config import parse_config
from hnmix.train.loop import train
from hnmix.run_config import load_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: 1 thread is faster
QUIET = ["--num_workers", "0", "--eval_every", "0", "-sp", "1", "-ss", "100"]


def run_in_process(out, *options):
    assert train(parse_config([*TINY, *QUIET, "-do", str(out), *options])) == 0


@pytest.mark.parametrize("optimizer", [
    ["--optimizer", "sgd", "--lr_per_256", "0.5", "--weight_decay", "1e-4", "--warmup_fraction", "0"],
    ["--optimizer", "lars", "-lrb", "0.5", "--momentum_schedule", "cosine", "--symmetric"],
    ["--optimizer", "adamw", "--symmetric"],
])
def test_each_optimizer_trains_checkpoints_and_resumes_with_identical_losses(tmp_path, optimizer):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run_in_process(straight, "-s", "6", *optimizer)
    run_in_process(halves, "-s", "6", "--stop_at", "3", *optimizer)
    run_in_process(halves, "-s", "6", "--resume", "latest", *optimizer)
    assert len(losses(straight)) == 6
    assert losses(halves) == losses(straight)
    assert [r["lr"] for r in metrics(halves)] == [r["lr"] for r in metrics(straight)]
    saved = load_run_config(straight / "config.yaml")
    assert saved["optimizer"] == optimizer[1]


def logged(capfd) -> str:
    """What the trainer logged to stderr, with rich's line wrapping undone."""
    return " ".join(capfd.readouterr().err.split())


def test_lr_per_256_sets_the_peak_from_the_global_batch_and_says_so(tmp_path, capfd):
    run_in_process(tmp_path, "-s", "4", "--optimizer", "sgd", "--lr_per_256", "0.04", "--warmup_fraction", "0",
                   "-lrm", "0")
    assert "Peak learning rate 0.00125 = lr_per_256 0.04 x global batch 8 / 256" in logged(capfd)
    # No warmup: the cosine from the peak; the record of step 1 holds the lr of the next step.
    assert metrics(tmp_path)[0]["lr"] == pytest.approx(0.00125 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert load_run_config(tmp_path / "config.yaml")["lr_base"] == pytest.approx(0.00125)


def test_an_epoch_start_resolves_with_the_steps_per_epoch_and_the_records_say_what_was_used(tmp_path):
    # --dataset synthetic of TINY: 64 images, batches of 8 (nothing held out with --eval_every 0): 8 steps per epoch.
    run_in_process(tmp_path, "-s", "12", "-st1h", "1ep", "-st2h", "0")
    records = metrics(tmp_path)
    assert [r["s1_in_use"] for r in records] == [0] * 8 + [4] * 4  # TINY: s1_hard 4 from step 8
    assert {r["s2_in_use"] for r in records} == {4}
    assert all("logit_type1" not in r for r in records[:8]) and all("logit_type1" in r for r in records[8:])
    card = ModelCard.load(tmp_path / "encoder/README.md").text
    assert "type 1 (4 per query) from step 8" in card and "type 2 (4 per query) from step 0" in card


def test_a_run_that_ended_before_mixing_says_so_on_the_card(tmp_path):
    run_in_process(tmp_path, "-s", "12", "--stop_at", "3", "-st1h", "10", "-st2h", "11")
    card = ModelCard.load(tmp_path / "encoder/README.md").text
    assert "no synthetic negatives were mixed in the steps trained (plain MoCo)" in card
    assert "| optimizer steps | 3 | of 12 scheduled |" in card


def test_an_epoch_start_past_the_end_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"start1_hard=2ep = step 16 is at or past the end of the run \(--steps 12\)"):
        run_in_process(tmp_path, "-s", "12", "-st1h", "2ep")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_resume_whose_new_steps_end_before_a_start_warns_instead(tmp_path, capfd):
    run_in_process(tmp_path, "-s", "12", "--stop_at", "3", "-st1h", "0", "-st2h", "8")
    capfd.readouterr()
    run_in_process(tmp_path, "-s", "6", "-st1h", "0", "-st2h", "8", "--resume", "latest")
    assert "After the change of --steps, option start2_hard=8 is at or past the end of the run (--steps 6)" in logged(capfd)


def test_the_command_line_refuses_a_late_start_with_one_line_and_exit_2(tmp_path, capfd):
    from hnmix.train.loop import main  # `python -m hnmix.train` is sys.exit(main()); a refusal needs no trainer start

    assert main([*TINY, "-s", "2", "-st2h", "5", "-do", str(tmp_path)]) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1].startswith("hnmix: error: option start2_hard=5 is at or past")


def test_deterministic_runs_under_torchs_deterministic_mode_and_repeats_its_losses(tmp_path, capsys):
    options = [*TINY, *QUIET, "-s", "3", "--deterministic"]
    first = run_train(*options, "-do", str(tmp_path / "a"), "-sp", "1")
    second = run_train(*options, "-do", str(tmp_path / "b"), "-sp", "1")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert "deterministic algorithms on" in " ".join(first.stderr.split())
    from hnmix.train.loop import main

    with pytest.raises(SystemExit) as help_exit:  # the option is documented
        main(["--help"])
    assert help_exit.value.code == 0 and "--deterministic" in capsys.readouterr().out
