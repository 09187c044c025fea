"""hnmix.train.config: the seed's option names, YAML files, precedence, and one-line validation errors."""

import dataclasses

import pytest
import yaml

from hnmix.errors import ConfigError
from hnmix.train.config import (
    TrainConfig,
    load_yaml_options,
    build_parser,
    check_queue_fits_global_batch,
    config_differences,
    config_to_yaml,
    parse_config,
)

SEED_OPTIONS = {
    # short alias: (long name, value on the command line, parsed value)
    "-dd": ("dir_data", "DATA", "DATA"), "-do": ("dir_out", "OUT", "OUT"), "-i": ("img_size", "64", 64),
    "-s": ("steps", "12000", 12000), "-bs": ("batch_size", "32", 32), "-ss": ("steps_save", "7", 7),
    "-sp": ("steps_print", "3", 3), "-se": ("seed", "5", 5), "-d": ("device", "cpu", "cpu"),
    "-lrb": ("lr_base", "0.1", 0.1), "-lrw": ("lr_warmup", "0.01", 0.01), "-lrm": ("lr_min", "0.001", 0.001),
    "-cg": ("clip_grad", "1.5", 1.5), "-a": ("arch", "resnet18", "resnet18"), "-r": ("resume", "latest", "latest"),
    "-dm": ("dim_moco", "64", 64), "-km": ("k_moco", "4096", 4096), "-mm": ("m_moco", "0.99", 0.99),
    "-tm": ("t_moco", "0.2", 0.2), "-nh": ("n_hard", "32", 32), "-s1h": ("s1_hard", "16", 16),
    "-s2h": ("s2_hard", "8", 8), "-st1h": ("start1_hard", "1", "1"), "-st2h": ("start2_hard", "2", "2"),
}


@pytest.mark.parametrize("alias", sorted(SEED_OPTIONS))
def test_every_seed_option_keeps_its_short_and_long_name(alias):
    name, text, value = SEED_OPTIONS[alias]
    assert parse_config([alias, text]).options()[name] == value
    assert parse_config([f"--{name}", text]).options()[name] == value


def test_seed_defaults_stay_the_defaults():
    config = parse_config([])
    assert (config.data.img_size, config.optimization.steps, config.optimization.batch_size, config.run.steps_save, config.run.steps_print) == (224, 25000, 64, 1000, 500)
    assert (config.optimization.lr_base, config.optimization.lr_warmup, config.optimization.lr_min, config.optimization.clip_grad, config.run.seed) == (2e-4, 2.5e-7, 2.5e-6, 5.0, 69420)
    assert (config.model.arch, config.model.dim_moco, config.method.k_moco, config.method.m_moco, config.method.t_moco) == ("efficientnet_b2", 128, 8192, 0.999, 0.07)
    assert (config.method.n_hard, config.method.s1_hard, config.method.s2_hard, config.method.start1_hard, config.method.start2_hard) == (32, 16, 16, "5000", "10000")


def test_the_seed_command_line_is_accepted_as_it_is():
    argv = "-dd DATA -do OUT -i 64 -s 40 -bs 32 -a resnet18 -km 4096 -nh 32 -s1h 16 -s2h 16 -st1h 1 -st2h 1".split()
    config = parse_config(argv + ["--dataset", "images/"])
    assert (config.data.dir_data, config.run.dir_out, config.data.img_size, config.method.k_moco, config.method.start2_hard) == ("DATA", "OUT", 64, 4096, "1")


def test_help_names_every_option_and_says_what_device_still_means(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in TrainConfig().options():
        assert f"--{name}" in text
    assert "accelerate launch" in text and "--gpu_ids" in text


def test_yaml_file_takes_long_names_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("k_moco: 1024\nbatch_size: 16\nlr_base: 1\narch: resnet18\n")
    config = parse_config(["--config", str(path), "--batch_size", "32"])
    assert (config.method.k_moco, config.optimization.batch_size, config.model.arch) == (1024, 32, "resnet18")
    assert config.optimization.lr_base == 1.0 and isinstance(config.optimization.lr_base, float)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = parse_config(["-km", "1024", "--dataset", "synthetic"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    reloaded = parse_config(["--config", str(path)])
    assert reloaded.run.config == str(path)
    assert reloaded.with_options(config=None) == config == TrainConfig.from_options(load_yaml_options(str(path)))


@pytest.mark.parametrize(
    "text,message",
    [
        ("k_moco: [1, 2\n", "not valid YAML at line"),
        ("- a\n- b\n", "must be a mapping"),
        ("k_mocoo: 5\n", "unknown option(s) k_mocoo"),
        ("k_moco: many\n", "option k_moco must be int"),
        ("lr_base: fast\n", "option lr_base must be float"),
        ("mixed_precision: fp8\n", "option mixed_precision must be one of"),
        ("steps: 0\n", "option steps must be >= 1"),
        ("data:\n  k_moco: 4096\n", "option k_moco belongs to group method, not data; move it there"),
        ("method:\n  k_mocoo: 5\n", "unknown option(s) k_mocoo"),
        ("method:\n  k_moco: many\n", "option k_moco must be int"),
    ],
)
def test_bad_config_files_give_one_line_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(path)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_yaml_in_groups_and_a_flat_one_give_the_same_config(tmp_path):
    """Recipes and config.yaml are grouped as the config is; an older run's flat file still loads."""
    grouped, flat = tmp_path / "grouped.yaml", tmp_path / "flat.yaml"
    grouped.write_text("data:\n  img_size: 32\naugmentation:\n  crop_scale: [0.08, 1]\nmethod:\n  k_moco: 4096\n"
                       "  start1_hard: 2ep\noptimization:\n  steps: 19000\nrun:\n  seed: 7\n")
    flat.write_text("img_size: 32\ncrop_scale: [0.08, 1]\nk_moco: 4096\nstart1_hard: 2ep\nsteps: 19000\nseed: 7\n")
    from_groups = parse_config(["--config", str(grouped)]).with_options(config=None)
    assert from_groups == parse_config(["--config", str(flat)]).with_options(config=None)
    assert (from_groups.data.img_size, from_groups.augmentation.crop_scale, from_groups.method.k_moco,
            from_groups.method.start1_hard, from_groups.optimization.steps, from_groups.run.seed) == (
        32, (0.08, 1.0), 4096, "2ep", 19000, 7)


def test_config_yaml_is_written_in_the_configs_groups_without_the_invocation():
    config = parse_config(["-km", "1024", "--resume", "latest", "--crop_scale", "0.08,1"])
    saved = yaml.safe_load(config_to_yaml(config))
    assert list(saved) == [f.name for f in dataclasses.fields(TrainConfig)]
    for group, options in saved.items():
        values = dataclasses.asdict(getattr(config, group))
        assert options == {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()
                           if name not in ("resume", "overwrite_dir_out", "config")}, group
    assert saved["method"]["k_moco"] == 1024 and saved["augmentation"]["crop_scale"] == [0.08, 1.0]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", "/nonexistent/run.yaml"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-km", "32", "-nh", "64"], "n_hard must be <= k_moco=32"),
        (["-nh", "1", "-s1h", "4"], "n_hard must be >= 2"),
        (["-nh", "0", "-s1h", "0", "-s2h", "4"], "n_hard must be >= 1"),
        (["-tm", "0"], "t_moco must be > 0"),
        (["-mm", "1.5"], "m_moco must be in [0, 1]"),
        (["-bs", "0"], "batch_size must be >= 1"),
        (["--bn_splits", "3", "-bs", "64"], "bn_splits"),
        (["-st1h", "-1"], "start1_hard must be a step (e.g. 5000) or a number of epochs (e.g. 10ep)"),
        (["-st2h", "3epochs"], "start2_hard must be a step (e.g. 5000) or a number of epochs (e.g. 10ep)"),
        (["--optimizer", "lars", "--momentum", "1"], "momentum must be < 1"),
        (["--lr_per_256", "0"], "lr_per_256 must be > 0"),
        (["--warmup_fraction", "1"], "warmup_fraction must be in [0, 1)"),
        (["--weight_decay", "-0.1"], "weight_decay must be >= 0"),
        (["-d", "gpu0"], "device must be `cpu` or a GPU index"),
    ],
)
def test_bad_values_give_one_line_naming_the_option(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_malformed_flags_exit_with_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["-km", "lots"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_queue_must_be_a_multiple_of_the_global_batch():
    config = parse_config(["-km", "1000", "-bs", "32"])
    with pytest.raises(ConfigError, match=r"k_moco=1000 must be a multiple of the global batch 64 .*--k_moco 960"):
        check_queue_fits_global_batch(config, num_processes=2)
    check_queue_fits_global_batch(parse_config(["-km", "1024", "-bs", "32"]), num_processes=2)


def test_config_differences_ignore_options_that_may_change_on_resume():
    saved = parse_config(["-km", "1024"]).to_dict()
    assert config_differences(saved, parse_config(["-km", "1024", "-s", "99", "-sp", "1", "-r", "latest"])) == []
    assert config_differences(saved, parse_config(["-km", "2048", "-a", "resnet18"])) == [
        "arch: 'efficientnet_b2' -> 'resnet18'", "k_moco: 1024 -> 2048"]


def test_a_mixing_start_at_or_past_the_end_is_refused_before_any_compute_with_the_way_out():
    with pytest.raises(ConfigError) as error:
        parse_config(["-s", "4000"])  # the seed's start1_hard 5000: MoCHi would silently never run
    message = str(error.value)
    assert "\n" not in message
    assert "start1_hard=5000 is at or past the end of the run (--steps 4000)" in message
    assert "--s1_hard 0" in message and "10ep" in message
    with pytest.raises(ConfigError, match="start2_hard=4000 is at or past"):
        parse_config(["-s", "4000", "-st1h", "0", "-st2h", "4000"])


def test_a_late_start_is_accepted_when_that_type_is_off_or_the_run_resumes():
    assert parse_config(["-s", "4000", "-s1h", "0", "-s2h", "0"]).optimization.steps == 4000
    # Judged by the trainer once it knows whether a checkpoint exists (a changed --steps warns).
    assert parse_config(["-s", "4000", "--resume", "latest"]).method.start1_hard == "5000"


def test_starts_take_steps_or_epochs_and_yaml_integers():
    from hnmix.train.config import curriculum_steps, start_step

    assert start_step("0", None) == 0 and start_step("250", None) == 250
    assert start_step("10ep", 96) == 960 and start_step("10ep", None) is None
    config = parse_config(["-st1h", "2ep", "-st2h", "30"])
    assert curriculum_steps(config.method, steps_per_epoch=7) == (14, 30)


def test_new_training_options_keep_the_seed_behaviour_by_default():
    config = parse_config([])
    assert (config.optimization.optimizer, config.optimization.weight_decay, config.optimization.momentum) == ("adamw", 0.01, 0.9)
    assert (config.optimization.lr_per_256, config.optimization.warmup_fraction) == (None, 0.1)
    assert (config.method.momentum_schedule, config.method.symmetric) == ("constant", False)
