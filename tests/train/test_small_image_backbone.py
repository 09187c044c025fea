"""--stem cifar and --head linear through the trainer: a run (both encoders, the kNN monitor),
its checkpoints and exact resume, the refusals of another stem or head on resume, the export
loaded by hnmix.load_encoder, python -m hnmix.evaluate on the checkpoint and the encoder, and an
arch that cannot take the stem refused with one line before compute."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_run import checkpoints, losses, metrics, run_train

import hnmix
from hnmix.backbones import create_backbone
from hnmix.errors import ConfigError
from hnmix.evaluate.cli import main as evaluate_main
from hnmix.evaluate.models import load_backbone
from hnmix.train.config import parse_config, run_options
from hnmix.train.state import checkpoint_to_resume
from hnmix.run_config import load_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# resnet18 (timm's test_resnet has a deep stem, which the cifar stem refuses) at CIFAR's size.
SMALL = ["--dataset", "synthetic", "--synthetic_size", "64", "-a", "resnet18", "-i", "32", "-bs", "8", "-dm", "16",
         "-km", "64", "-nh", "8", "-s1h", "4", "-s2h", "4", "-st1h", "0", "-st2h", "1", "--stem", "cifar",
         "--head", "linear", "-s", "4", "-sp", "1", "--num_workers", "0"]


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """4 uninterrupted steps with the CIFAR stem and the linear head, a checkpoint every 2."""
    dir_out = tmp_path_factory.mktemp("cifar_stem")
    result = run_train(*SMALL, "-ss", "2", "-do", str(dir_out))
    assert result.returncode == 0, result.stderr[-3000:]
    return dir_out


def query_backbone(checkpoint) -> torch.nn.Module:
    """The trained query backbone, rebuilt from a checkpoint's weights by hand."""
    weights = load_file(checkpoint / "model.safetensors")
    backbone = create_backbone("resnet18", stem="cifar")
    backbone.load_state_dict({k.removeprefix("encoder_q.backbone."): v for k, v in weights.items()
                              if k.startswith("encoder_q.backbone.")})
    return backbone.eval()


def test_both_encoders_train_with_the_cifar_stem_and_the_linear_head(cifar_run):
    assert checkpoints(cifar_run) == ["step_00000002", "step_00000004"]
    final = cifar_run / "checkpoints/step_00000004"
    weights = load_file(final / "model.safetensors")
    for encoder in ("encoder_q", "encoder_k"):
        assert weights[f"{encoder}.backbone.conv1.weight"].shape == (64, 3, 3, 3)
        assert weights[f"{encoder}.head.weight"].shape == (16, 512) and f"{encoder}.head.0.weight" not in weights
    assert not torch.equal(weights["encoder_q.backbone.conv1.weight"], weights["encoder_k.backbone.conv1.weight"])
    saved = load_run_config(final / "config.yaml")
    assert (saved["stem"], saved["head"]) == ("cifar", "linear")
    records = metrics(cifar_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in records)
    assert 0 <= records[-1]["knn_top1"] <= 100  # the kNN monitor ran on the CIFAR-stem backbone


def test_a_resume_repeats_the_uninterrupted_losses(cifar_run, tmp_path):
    # The uninterrupted run's checkpoint of step 2 and its records (those after step 2 go on resume).
    shutil.copytree(cifar_run / "checkpoints/step_00000002", tmp_path / "checkpoints/step_00000002")
    shutil.copy(cifar_run / "metrics.jsonl", tmp_path)
    second = run_train(*SMALL, "-ss", "100", "--resume", "latest", "-do", str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(tmp_path) == losses(cifar_run)


@pytest.mark.parametrize("change, difference", [
    (["--stem", "default"], "stem: 'cifar' -> 'default'"),
    (["--head", "mlp"], "head: 'linear' -> 'mlp'"),
])
def test_a_resume_with_another_stem_or_head_is_refused(cifar_run, change, difference):
    config = parse_config([*SMALL, *change, "-do", str(cifar_run), "--resume", "latest"])
    with pytest.raises(ConfigError) as error:
        checkpoint_to_resume(config, num_processes=1)
    assert "\n" not in str(error.value) and "cannot resume" in str(error.value) and difference in str(error.value)


def test_a_checkpoint_from_before_the_options_resumes_as_default_stem_and_mlp_head(tmp_path):
    checkpoint = tmp_path / "checkpoints/step_00000004"
    checkpoint.mkdir(parents=True)
    plain = [a for a in SMALL if a not in ("--stem", "cifar", "--head", "linear")]
    config = parse_config([*plain, "-do", str(tmp_path), "--resume", str(checkpoint)])
    saved = run_options(config)
    del saved["stem"], saved["head"]  # as an hnmix without these options wrote it
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(saved))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "num_processes": 1}))
    assert checkpoint_to_resume(config, num_processes=1) == checkpoint
    with pytest.raises(ConfigError, match="stem: 'default' -> 'cifar'"):
        checkpoint_to_resume(parse_config([*SMALL, "-do", str(tmp_path), "--resume", str(checkpoint)]), 1)


def test_load_encoder_gives_the_trained_backbone(cifar_run):
    trained = query_backbone(cifar_run / "checkpoints/step_00000004")
    loaded = hnmix.load_encoder(cifar_run / "encoder").eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained(images))
        assert loaded.forward_features(images).shape == (3, 512, 4, 4)


def test_evaluate_builds_the_cifar_stem_from_the_checkpoint_and_the_encoder(cifar_run, capsys):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    trained = query_backbone(cifar_run / "checkpoints/step_00000004")
    for source in (cifar_run / "checkpoints/step_00000004", cifar_run / "encoder"):
        model = load_backbone(str(source))
        with torch.no_grad():
            torch.testing.assert_close(model.backbone.eval()(images), trained(images))
    code = evaluate_main([str(cifar_run / "encoder"), "--protocol", "knn", "--json", str(cifar_run / "knn.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((cifar_run / "knn.json").read_text())
    assert 0 <= report["knn_top1"] <= report["knn_top5"] <= 100 and report["model"]["kind"] == "encoder"


@pytest.mark.parametrize("arch, why", [("resnet18d", "its stem is deep"), ("efficientnet_b2", "no ResNet stem")])
def test_an_arch_that_cannot_take_the_cifar_stem_is_one_line_before_compute(tmp_path, capfd, arch, why):
    from hnmix.train.loop import main  # the command line's, in this process: a refusal needs no trainer start

    assert main([*SMALL, "-a", arch, "-do", str(tmp_path / "run")]) == 2
    stderr = capfd.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("hnmix: error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    assert f"option stem cifar: {arch} cannot take the CIFAR stem" in errors[0] and why in errors[0]
    assert not (tmp_path / "run").exists()  # refused before dir_out was made
