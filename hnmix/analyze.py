"""`python -m hnmix.analyze CHECKPOINT`: MoCHi's analysis of hardness (Kalantidis et al. 2020,
sections 3-4) for a training checkpoint, as a PNG and a JSON (README, Pictures; the formulas are
in `hnmix.evaluate.hardness`).

The queries are one batch of `--batch_size` held-out images scored with `hnmix.mixing.mix_logits`
(n_hard and each type's count from the flags, else the run's, else MoCHi's 32/16/16 for a plain
MoCo run); alignment and uniformity take both views of up to `--max_samples`. The held-out split
is the kNN monitor's (`load_eval_splits` with the run's options), its views the training
augmentation seeded as in epoch 0; both encoders run in eval mode. A held-out image carved out of
the train split was also trained on: its own key may sit in the queue, and is masked as in training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import torch
import torch.utils.data
import yaml

from hnmix.data.augmentation import augmentation_from
from hnmix.data.transforms import moco_v2_photometric
from hnmix.data.two_views import TwoViewDataset
from hnmix.errors import ConfigError, describe, exit_code
from hnmix.evaluate.hardness import (
    alignment,
    false_negative_fraction,
    logit_groups,
    logit_histograms,
    synthetic_harder_than_hardest,
    top_n_grid,
    uniformity,
)
from hnmix.evaluate.splits import bounded_subset, load_eval_splits
from hnmix.mixing import NEGATIVE_TYPES, mix_logits, validate_mixing_sizes
from hnmix.moco import MoCo, MoCoEncoder
from hnmix.pictures.hardness import draw_hardness
from hnmix.run_config import load_run_config

MOCHI_SIZES = {"n_hard": 32, "s1_hard": 16, "s2_hard": 16}  # for a run that trained without mixing (other types: 0)
DEFAULT_SEED = 69420


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hnmix.analyze",
        description="MoCHi's analysis of hardness for a checkpoint: logit histograms, false negatives among the "
        "hardest, synthetic negatives harder than every real one, alignment and uniformity; a PNG and a JSON.")
    parser.add_argument("checkpoint", help="a training checkpoint, DIR_OUT/checkpoints/step_N")
    data = parser.add_argument_group("DATA (defaults: the checkpoint's config.yaml)")
    for name in ("dataset", "split", "image_column", "label_column", "dir_data"):
        data.add_argument(f"--{name}")
    data.add_argument("--synthetic_size", type=int)
    data.add_argument("-i", "--img_size", type=int)
    data.add_argument("--seed", type=int, help="of the data, the views and the mixing draws")
    analysis = parser.add_argument_group("ANALYSIS")
    analysis.add_argument("-bs", "--batch_size", type=int, default=256, help="held-out queries in the batch scored "
                          "against the queue (default: 256)")
    analysis.add_argument("--max_samples", type=int, default=1000, help="held-out images for alignment and "
                          "uniformity (default: 1000)")
    for name, value in size_defaults().items():
        analysis.add_argument(f"--{name}", type=int, help=f"(default: the run's, or {value} if it did not mix)")
    analysis.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--png", help="(default: CHECKPOINT/analysis.png)")
    parser.add_argument("--json", help="(default: CHECKPOINT/analysis.json)")
    return parser


def load_moco(checkpoint: Path) -> tuple[MoCo, dict[str, Any], int]:
    """The MoCo model of a trainer checkpoint (both encoders and the queue, `model.safetensors`),
    its config.yaml and its step."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not ((checkpoint / "model.safetensors").is_file() and (checkpoint / "config.yaml").is_file()):
        raise ConfigError(f"{checkpoint} is not a training checkpoint (model.safetensors + config.yaml); pass "
                          "DIR_OUT/checkpoints/step_N")
    try:
        config = load_run_config(checkpoint / "config.yaml")
        weights = load_file(checkpoint / "model.safetensors")
    except (OSError, yaml.YAMLError, SafetensorError) as error:
        raise ConfigError(f"cannot read the checkpoint {checkpoint} ({describe(error)}); pass a complete one") from None
    needed = ("encoder_q.", "encoder_k.", "queue.keys")
    if not isinstance(config, dict) or not all(any(k.startswith(p) for k in weights) for p in needed):
        raise ConfigError(f"{checkpoint} holds no MoCo model (encoder_q, encoder_k and queue); pass a checkpoint "
                          "written by hnmix.train")
    try:
        encoder = MoCoEncoder(config["arch"], config["dim_moco"], stem=config.get("stem", "default"),
                              head=config.get("head", "mlp"))
        moco = MoCo(encoder, dim_moco=config["dim_moco"],
                    k_moco=config["k_moco"], m_moco=config["m_moco"], t_moco=config["t_moco"])
        moco.load_state_dict(weights)
    except (KeyError, RuntimeError, ValueError) as error:
        raise ConfigError(f"the checkpoint {checkpoint} does not fit its config.yaml ({describe(error)}); pass a "
                          "checkpoint written by hnmix.train") from None
    state = checkpoint / "trainer_state.json"
    step = json.loads(state.read_text()).get("step", 0) if state.is_file() else 0
    return moco.eval(), config, int(step)


def size_defaults() -> dict[str, int]:
    """n_hard and each registered type's `count_option` ("s1_hard"), with its value for a run that did not mix."""
    return MOCHI_SIZES | {t.count_option: MOCHI_SIZES.get(t.count_option, 0) for t in NEGATIVE_TYPES.values()}


def mixing_sizes(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, int]:
    """n_hard and each type's count (s1_hard, s2_hard, ...): the flags, else the run's, else
    `size_defaults` when the run did not mix."""
    run = config if any(config.get(t.count_option) for t in NEGATIVE_TYPES.values()) else {}
    return {name: run.get(name, default) if getattr(args, name) is None else getattr(args, name)
            for name, default in size_defaults().items()}


def train_split_rows(held_out: datasets.Dataset) -> Optional[torch.Tensor]:
    """[N] the train-split row of each held-out image, when the held-out split was cut out of it
    (`select` keeps the original rows in the dataset's indices mapping); None otherwise."""
    indices = getattr(held_out, "_indices", None)
    if indices is None:
        return None
    return torch.as_tensor(np.asarray(indices.column(0).to_pylist(), dtype=np.int64))


@torch.no_grad()
def project(moco: MoCo, views: TwoViewDataset, count: int, *, batch_size: int, num_workers: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Both views of the first `count` images of `views`: {"q": encoder_q(view_q) [N, d],
    "q_of_k": encoder_q(view_k) [N, d], "k": encoder_k(view_k) [N, d], "index" [N], "label" [N]}."""
    loader = torch.utils.data.DataLoader(views, batch_size=batch_size, sampler=list(range(count)),
                                         num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = {"q": [], "q_of_k": [], "k": [], "index": [], "label": []}
    for view_q, view_k, index, label, _ in loader:
        view_q, view_k = view_q.to(device), view_k.to(device)
        parts["q"].append(moco.encoder_q(view_q).cpu())
        parts["q_of_k"].append(moco.encoder_q(view_k).cpu())
        parts["k"].append(moco.encoder_k(view_k).cpu())
        parts["index"].append(index)
        parts["label"].append(label)
    return {name: torch.cat(values) for name, values in parts.items()}


def analyze_batch(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, ids: Optional[torch.Tensor],
                  moco: MoCo, *, n_hard: int, seed: int, **sizes: int) -> dict[str, Any]:
    """The numbers of one batch of queries q [B, d] with keys k [B, d] against `moco`'s queue.
    ids: [B] train-split rows of the queries (their own keys in the queue are masked) or None;
    sizes: each type's count by its `size` (s1, s2)."""
    queue = moco.queue
    K = queue.size
    mixed = mix_logits(q, k, queue.keys, temperature=moco.t_moco, n_hard=n_hard,
                       ids=ids, queue_ids=queue.ids if ids is not None else None,
                       generator=torch.Generator(device=q.device).manual_seed(seed), **sizes)
    groups = logit_groups(mixed, queue_size=K, sizes=sizes)
    top_n = top_n_grid(K, n_hard)
    return {
        "logits": {"mean": {name: g.mean().item() if g.numel() else None for name, g in groups.items()},
                   "histograms": logit_histograms(groups)},
        "false_negative_fraction": {
            "top_n": top_n,
            "fraction": false_negative_fraction(mixed.logits[:, 1 : 1 + K], labels, queue.labels, top_n)},
        "synthetic_harder_than_hardest": synthetic_harder_than_hardest(mixed.logits, queue_size=K, sizes=sizes),
    }


def run_analysis(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path]:
    checkpoint = Path(args.checkpoint)
    moco, config, step = load_moco(checkpoint)
    sizes = mixing_sizes(args, config)
    by_size = {t.size: sizes[t.count_option] for t in NEGATIVE_TYPES.values()}  # mix_logits' keywords: s1, s2
    try:
        validate_mixing_sizes(queue_size=moco.queue.size, temperature=moco.t_moco, n_hard=sizes["n_hard"],
                              **by_size)
    except ValueError as error:
        raise ConfigError(f"option {error}") from None
    for name in ("batch_size", "max_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"option {name} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise ConfigError(f"option num_workers must be >= 0, got {args.num_workers}")

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else config.get(name, default)

    seed, img_size, dataset = pick("seed", DEFAULT_SEED), pick("img_size", 224), pick("dataset", None)
    if not dataset:
        raise ConfigError(f"{checkpoint}/config.yaml names no dataset; pass --dataset")
    png = Path(args.png) if args.png else checkpoint / "analysis.png"
    json_path = Path(args.json) if args.json else checkpoint / "analysis.json"
    for path, suffix in ((png, ".png"), (json_path, ".json")):
        if path.suffix.lower() != suffix or not path.parent.is_dir():
            raise ConfigError(f"cannot write {path}: pass a {suffix} file in an existing folder")

    held_out_size = config.get("eval_split_size", 0.1)
    if isinstance(held_out_size, float) and held_out_size >= 1:  # a count, stored as the option's float
        held_out_size = int(held_out_size)
    splits = load_eval_splits(dataset, split=pick("split", "train"), image_column=pick("image_column", "image"),
                              label_column=pick("label_column", None), eval_split_size=held_out_size, seed=seed,
                              cache_dir=pick("dir_data", None), synthetic_size=pick("synthetic_size", 512))
    held_out = bounded_subset(splits.held_out, args.max_samples, seed=seed, salt=7)
    carved = not splits.held_out_source.endswith(" split validation")
    rows = train_split_rows(held_out) if carved else None
    augmentation = augmentation_from(config)  # the run's augmentation (MoCo v2's for a run from before the options)
    views = TwoViewDataset(held_out, image_column=splits.image_column, label_column=splits.label_column,
                           img_size=img_size, seed=seed, photometric=moco_v2_photometric(img_size, augmentation),
                           augmentation=augmentation)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moco.to(device)
    projected = project(moco, views, len(held_out), batch_size=args.batch_size, num_workers=args.num_workers,
                        device=device)
    batch = min(args.batch_size, len(held_out))
    ids = rows[projected["index"][:batch]].to(device) if rows is not None else None
    result = analyze_batch(projected["q"][:batch].to(device), projected["k"][:batch].to(device),
                           projected["label"][:batch].to(device), ids, moco,
                           n_hard=sizes["n_hard"], seed=seed, **by_size)
    analysis = {
        "checkpoint": str(checkpoint), "step": step, "arch": config.get("arch"), "dataset": dataset,
        "held_out": splits.held_out_source, "queries": batch, "samples": len(held_out),
        "own_keys_masked": rows is not None, "queue_size": moco.queue.size, "temperature": moco.t_moco,
        "queue_labelled": int((moco.queue.labels >= 0).sum()), **sizes, "seed": seed, "img_size": img_size,
        **result,
        "alignment": alignment(projected["q"], projected["q_of_k"]),
        "uniformity": uniformity(projected["q"]),
    }
    return analysis, png, json_path


def _json_ready(value: Any) -> Any:
    """NaN (an undefined fraction) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def analyze(args: argparse.Namespace) -> None:
    """Compute, then write the JSON and the PNG."""
    analysis, png, json_path = run_analysis(args)
    json_path.write_text(json.dumps(_json_ready(analysis), indent=1) + "\n")
    draw_hardness(analysis, png)
    print(f"wrote {png} and {json_path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return exit_code(lambda: analyze(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
