"""python -m hnmix.analyze: its numbers equal a direct float64 recomputation on a tiny checkpoint."""

import json
import math

import datasets
import pytest
import torch
from data_images import write_image_folder
from method.test_negative_types import EXTRAPOLATION
from oracle import oracle_logits
from PIL import Image
from safetensors.torch import load_file
from tiny_run import TINY, run_train

from hnmix.analyze import main
from hnmix.data.sources import load_image_dataset
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import TwoViewDataset
from hnmix.evaluate.splits import load_eval_splits
from hnmix.mixing import NEGATIVE_TYPES, register_negative_type
from hnmix.moco import MoCo, MoCoEncoder
from hnmix.pictures.hardness import HARDNESS_PIXELS, hardness_figure
from hnmix.run_config import load_run_config

BATCH, HELD_OUT = 8, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch (8 steps of 8) on a 64-image folder: the queue of 64 holds every image once, the
    held-out images (16, cut out of the train split) included."""
    root = tmp_path_factory.mktemp("analyze")
    data = write_image_folder(root / "images", {name: 16 for name in "abcd"})
    out = root / "out"
    result = run_train(*TINY[2:], "--dataset", str(data), "-s", "8", "-sp", "8", "-ss", "8", "--eval_every", "0",
                       "--eval_split_size", str(HELD_OUT), "--num_workers", "0", "-do", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out / "checkpoints/step_00000008"


def image_paths(dataset):
    return [cell["path"] for cell in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


@torch.no_grad()
def recompute(data, checkpoint):
    """Everything from the files, in float64, one query at a time where it matters."""
    config = load_run_config(checkpoint / "config.yaml")
    moco = MoCo(MoCoEncoder(config["arch"], config["dim_moco"]), dim_moco=config["dim_moco"], k_moco=config["k_moco"],
                m_moco=config["m_moco"], t_moco=config["t_moco"])
    moco.load_state_dict(load_file(checkpoint / "model.safetensors"))
    moco.eval()
    seed = config["seed"]
    held_out = load_eval_splits(str(data), eval_split_size=HELD_OUT, seed=seed).held_out
    views = TwoViewDataset(held_out, image_column="image", label_column="label", img_size=config["img_size"],
                           seed=seed, photometric=moco_v2_photometric(config["img_size"]))
    samples = [views[i] for i in range(len(held_out))]
    view_q, view_k = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    labels = torch.tensor([s[3] for s in samples])
    q, q_of_k, k = moco.encoder_q(view_q), moco.encoder_q(view_k), moco.encoder_k(view_k)
    train_paths = image_paths(load_image_dataset(str(data), seed=seed))
    ids = torch.tensor([train_paths.index(path) for path in image_paths(held_out)])
    logits, hard = oracle_logits(q[:BATCH], k[:BATCH], moco.queue.keys, temperature=moco.t_moco,
                                 n_hard=config["n_hard"], s1=config["s1_hard"], s2=config["s2_hard"], ids=ids[:BATCH],
                                 queue_ids=moco.queue.ids, generator=torch.Generator().manual_seed(seed))
    return config, moco, labels[:BATCH], ids[:BATCH], q.double(), q_of_k.double(), logits, hard


def test_analyze_writes_numbers_that_a_direct_computation_gives(run, tmp_path):
    data, checkpoint = run
    png, json_path = tmp_path / "analysis.png", tmp_path / "analysis.json"
    assert main([str(checkpoint), "-bs", str(BATCH), "--num_workers", "0", "--png", str(png),
                 "--json", str(json_path)]) == 0
    with Image.open(png) as image:
        assert image.size == HARDNESS_PIXELS
    got = json.loads(json_path.read_text())
    config, moco, labels, ids, q, q_of_k, logits, hard = recompute(data, checkpoint)
    K, s1, s2, n_hard = moco.queue.size, config["s1_hard"], config["s2_hard"], config["n_hard"]
    assert (got["queries"], got["samples"], got["step"], got["queue_size"]) == (BATCH, HELD_OUT, 8, K)
    assert (got["n_hard"], got["s1_hard"], got["s2_hard"]) == (n_hard, s1, s2)

    # Each held-out image was trained on: its own key is in the queue once, and masked.
    assert got["own_keys_masked"] and ((ids.unsqueeze(1) == moco.queue.ids).sum(1) == 1).all()
    finite = [[j for j in range(K) if math.isfinite(logits[b, 1 + j])] for b in range(BATCH)]
    groups = {
        "positive": [logits[b, 0].item() for b in range(BATCH)],
        "queue": [logits[b, 1 + j].item() for b in range(BATCH) for j in finite[b]],
        "hard": [logits[b, 1 + j].item() for b in range(BATCH) for j in hard[b].tolist()],
        "type1": [logits[b, 1 + K + t].item() for b in range(BATCH) for t in range(s1)],
        "type2": [logits[b, 1 + K + s1 + t].item() for b in range(BATCH) for t in range(s2)],
    }
    assert len(groups["queue"]) == BATCH * (K - 1)
    for name, values in groups.items():
        assert sum(got["logits"]["histograms"][name]) == len(values), name
        assert got["logits"]["mean"][name] == pytest.approx(sum(values) / len(values), abs=1e-4), name

    for n, fraction in zip(got["false_negative_fraction"]["top_n"], got["false_negative_fraction"]["fraction"]):
        same = known = 0
        for b in range(BATCH):
            for j in sorted(finite[b], key=lambda j: -logits[b, 1 + j].item())[:n]:
                if moco.queue.labels[j] >= 0:
                    known += 1
                    same += int(moco.queue.labels[j] == labels[b])
        assert fraction == pytest.approx(same / known, abs=1e-9), n

    for name, columns in (("type1", range(s1)), ("type2", range(s1, s1 + s2)), ("all", range(s1 + s2))):
        above = [logits[b, 1 + K + t].item() > max(logits[b, 1 + j].item() for j in finite[b])
                 for b in range(BATCH) for t in columns]
        assert got["synthetic_harder_than_hardest"][name] == pytest.approx(sum(above) / len(above), abs=1e-9), name

    N = len(q)
    assert got["alignment"] == pytest.approx(sum((q[i] - q_of_k[i]).norm().item() ** 2 for i in range(N)) / N,
                                             rel=1e-5)
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    direct = math.log(sum(math.exp(-2 * (q[i] - q[j]).norm().item() ** 2) for i, j in pairs) / len(pairs))
    assert got["uniformity"] == pytest.approx(direct, rel=1e-5)


@pytest.fixture
def extrapolation():
    register_negative_type(EXTRAPOLATION)
    yield EXTRAPOLATION
    del NEGATIVE_TYPES[EXTRAPOLATION.name]


def test_a_registered_type_gets_its_option_numbers_and_figure_rows(run, tmp_path, extrapolation):
    _, checkpoint = run
    json_path = tmp_path / "analysis.json"
    assert main([str(checkpoint), "-bs", str(BATCH), "--num_workers", "0", "--s3_hard", "2",
                 "--png", str(tmp_path / "analysis.png"), "--json", str(json_path)]) == 0
    got = json.loads(json_path.read_text())
    assert got["s3_hard"] == 2 and sum(got["logits"]["histograms"]["extrapolation"]) == 2 * BATCH
    assert list(got["synthetic_harder_than_hardest"]) == ["type1", "type2", "extrapolation", "all"]
    histograms, _, bars, text = hardness_figure(got).axes
    assert f"extrapolation synthetic ({2 * BATCH})" in [t.get_text() for t in histograms.get_legend().get_texts()]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["type-1", "type-2", "extrapolation", "all synthetic"]
    assert ", s1 4, s2 4, s3 2, T " in text.texts[0].get_text()


def test_analyze_refuses_what_is_not_a_checkpoint_in_one_line(run, tmp_path, capsys):
    _, checkpoint = run
    assert main([str(tmp_path)]) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err
    assert main([str(checkpoint), "--n_hard", "1", "--s1_hard", "4"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hnmix: error: option s1 > 0 mixes two hard negatives") and error.count("\n") == 1
