"""The model card (`README.md`) the Hub shows for an exported encoder: metadata, training setup,
evaluation, how to load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hnmix.data.augmentation import NORMALIZATIONS, normalization
from hnmix.data.synthetic import SYNTHETIC_SOURCES
from hnmix.data.transforms import EVAL_CROP_PCT
from hnmix.mixing import NEGATIVE_TYPES

MODEL_CARD_TAGS = ("image-feature-extraction", "timm", "self-supervised", "moco", "mochi", "hnmix")


PAPER_URL = "https://arxiv.org/abs/2010.01028"


# (option, what it means) in the order the card lists them.
_MOCO_PARAMETERS = (
    ("dim_moco", "projection output size (the head is not part of this model)"),
    ("k_moco", "queue size K (negatives per query)"),
    ("m_moco", "momentum of the key encoder"),
    ("t_moco", "softmax temperature"),
)


def _mochi_parameters() -> tuple[tuple[str, str], ...]:
    """n_hard, then each negative type's count and start options, as registered."""
    kinds = NEGATIVE_TYPES.values()
    return ((("n_hard", "hardest queue negatives mixed per query"),)
            + tuple((t.count_option, f"{t.label} synthetic negatives per query ({t.about})") for t in kinds)
            + tuple((t.start_option, f"first step with {t.label} negatives") for t in kinds))


def _negatives_reported(results: dict[str, Any]) -> bool:
    """Whether `results` say which negative types were used (`type1_from`, ...; None: never)."""
    return any(f"{t.name}_from" in results for t in NEGATIVE_TYPES.values())


# (results key prefix, row name); accuracies are percentages, `{prefix}_top1` / `{prefix}_top5`.
_EVALUATIONS = (("knn", "kNN"), ("linear", "linear probe"))


def dataset_is_hub_id(dataset: str) -> bool:
    """True when `dataset` names a Hub dataset: not a generated one (`synthetic`...), not an existing or path-like
    local path, and a valid repo id (`name` or `owner/name`)."""
    if dataset in SYNTHETIC_SOURCES or dataset.startswith(("/", ".", "~")) or Path(dataset).exists():
        return False
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return False
    return True


def write_model_card(directory: str | Path, *, config: dict[str, Any], results: Optional[dict[str, Any]] = None,
                     repo_id: Optional[str] = None, curves: Optional[str] = None) -> Path:
    """Write `directory/README.md`, the Hub model card of an exported encoder; returns its path.

    config: the training options by flat name (`TrainConfig.options()`); only the dataset, split, arch,
    img_size, steps, batch and MoCo/MoCHi options are used, never paths or the environment.
    results: optional `knn_top1`, `knn_top5`, `knn_k`, `linear_top1`, `linear_top5` (accuracies in
    percent, 0-100), `steps` (steps actually trained), `global_batch`, `num_processes`,
    `eval_split`. repo_id: the Hub id the loading example names (else a placeholder). curves: the
    name of the training-curves image inside `directory`, which the card then shows.
    """
    results = dict(results or {})
    dataset = str(config.get("dataset", ""))
    card_data = ModelCardData(
        library_name="timm",
        tags=list(MODEL_CARD_TAGS),
        datasets=[dataset] if dataset_is_hub_id(dataset) else None,
        pipeline_tag="image-feature-extraction",
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{_card_body(config, results, repo_id, curves)}")
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def _card_body(config: dict[str, Any], results: dict[str, Any], repo_id: Optional[str],
               curves: Optional[str] = None) -> str:
    arch = config.get("arch", "unknown")
    title = repo_id.split("/")[-1] if repo_id else f"{arch} trained with hnmix"
    mochi = (f"MoCo v2 and MoCHi hard negative mixing ([Kalantidis et al., *Hard Negative Mixing for Contrastive "
             f"Learning*, NeurIPS 2020]({PAPER_URL}))")
    if _negatives_reported(results) and not _mixing_was_used(results):
        mochi = "MoCo v2 (MoCHi's synthetic negatives were not used in the steps trained; see Training)"
    stem = " with the CIFAR stem" if config.get("stem") == "cifar" else ""
    sections = [
        f"# {title}\n",
        f"An image encoder (`{arch}`{stem}, timm) trained without labels with {mochi}, "
        "trained with hnmix. It has no classifier (`num_classes=0`): it maps an image to one "
        "feature vector, for retrieval, kNN, clustering or a linear probe. The projection head and the "
        "momentum encoder used in training are not included.\n",
        "## Training\n",
        _training_table(config, results),
        "## Evaluation\n\n" + _evaluation_table(results) if _has_evaluation(results) else "",
        f"## Training curves\n\n![Loss, learning rate, proxy accuracy, kNN, logits and hardness over the steps]"
        f"({curves})\n" if curves else "",
        "## How to use\n",
        _usage(repo_id, config),
        "## Citation\n",
        "```bibtex\n@inproceedings{kalantidis2020hard,\n"
        "  title={Hard Negative Mixing for Contrastive Learning},\n"
        "  author={Kalantidis, Yannis and Sariyildiz, Mert Bulent and Pion, Noe and Weinzaepfel, Philippe and Larlus, Diane},\n"
        "  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},\n  year={2020}\n}\n```\n",
    ]
    return "\n".join(section for section in sections if section)


def _describe_dataset(config: dict[str, Any]) -> str:
    dataset = str(config.get("dataset", ""))
    if dataset_is_hub_id(dataset):
        name = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
    elif dataset in SYNTHETIC_SOURCES:
        name = f"`{dataset}` (images generated in memory by hnmix, for demos, tests and benchmarks)"
    else:
        name = "a local dataset"
    split = config.get("split")
    return f"{name}, split `{split}`" if split else name


def _training_table(config: dict[str, Any], results: dict[str, Any]) -> str:
    rows = [("dataset", _describe_dataset(config), ""), ("architecture", f"`{config.get('arch')}`", "timm model name")]
    if config.get("stem") == "cifar":
        rows.append(("stem", "CIFAR", "conv1 3x3 stride 1, no max-pool (`--stem cifar`); load with hnmix.load_encoder"))
    if config.get("img_size") is not None:
        rows.append(("image size", f"{config['img_size']} x {config['img_size']}", ""))
    scheduled = config.get("steps")
    trained = results.get("steps", config.get("stop_at") or scheduled)
    if trained is not None:
        rows.append(("optimizer steps", f"{trained}", f"of {scheduled} scheduled" if scheduled and trained != scheduled else ""))
    global_batch = results.get("global_batch", config.get("global_batch"))
    processes = results.get("num_processes", config.get("num_processes"))
    if global_batch is None and processes and config.get("batch_size"):
        global_batch = config["batch_size"] * processes
    if global_batch is not None:
        rows.append(("global batch", f"{global_batch}", f"{processes} processes" if processes else ""))
    elif config.get("batch_size") is not None:
        rows.append(("batch per process", f"{config['batch_size']}", ""))
    if config.get("optimizer"):
        rows.append(("optimizer", _describe_optimizer(config), ""))
    for name, meaning in _MOCO_PARAMETERS + _mochi_parameters():
        if name in config:
            rows.append((f"`{name}`", f"{config[name]}", meaning))
    if _negatives_reported(results):
        rows.append(("negatives used", _describe_negatives(config, results), ""))
    lines = ["| setting | value | meaning |", "|---|---|---|"] + [f"| {key} | {value} | {meaning} |"
                                                                 for key, value, meaning in rows]
    return "\n".join(lines) + "\n"


def _describe_optimizer(config: dict[str, Any]) -> str:
    momentum = f", momentum {config.get('momentum')}" if config.get("optimizer") in ("sgd", "lars") else ""
    per_256 = f" ({config['lr_per_256']} x global batch / 256)" if config.get("lr_per_256") else ""
    return (f"{config['optimizer']}, peak lr {config.get('lr_base'):g}{per_256}, weight decay "
            f"{config.get('weight_decay')}{momentum}, cosine schedule")


def _mixing_was_used(results: dict[str, Any]) -> bool:
    return any(results.get(f"{t.name}_from") is not None for t in NEGATIVE_TYPES.values())


def _describe_negatives(config: dict[str, Any], results: dict[str, Any]) -> str:
    """Which negatives the run really used: the queue always, each synthetic type from its first step."""
    used = [f"the queue (K={config.get('k_moco')})"]
    for t in NEGATIVE_TYPES.values():
        if results.get(f"{t.name}_from") is not None:
            name = t.label.replace("-", " ")  # "type 1", as cards have always said
            used.append(f"{name} ({config.get(t.count_option)} per query) from step {results[f'{t.name}_from']}")
    if len(used) == 1:
        return used[0] + " only: no synthetic negatives were mixed in the steps trained (plain MoCo)"
    return "; ".join(used)


def _has_evaluation(results: dict[str, Any]) -> bool:
    return any(f"{prefix}_top{k}" in results for prefix, _ in _EVALUATIONS for k in (1, 5))


def _format_accuracy(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}"


def _evaluation_table(results: dict[str, Any]) -> str:
    lines = ["| protocol | top-1 (%) | top-5 (%) |", "|---|---|---|"]
    for prefix, label in _EVALUATIONS:
        if f"{prefix}_top1" in results or f"{prefix}_top5" in results:
            if prefix == "knn" and results.get("knn_k"):
                label = f"kNN (k={results['knn_k']})"
            lines.append(f"| {label} | {_format_accuracy(results.get(f'{prefix}_top1'))} "
                         f"| {_format_accuracy(results.get(f'{prefix}_top5'))} |")
    note = f"\nOn split `{results['eval_split']}`.\n" if results.get("eval_split") else ""
    return "\n".join(lines) + "\n" + note


# How the card names the normalisations `--normalize` knows by name.
_NORMALIZATION_NAMES = {"imagenet": "ImageNet", "cifar10": "CIFAR-10"}


def _preprocessing(config: dict[str, Any]) -> str:
    """The evaluation preprocessing the export's config.json records, in words: the run's
    --eval_crop_pct and --normalize (a config from before those options: 0.875 and ImageNet's)."""
    size, crop_pct = config.get("img_size"), float(config.get("eval_crop_pct") or EVAL_CROP_PCT)
    if not size:
        crop = "resize, centre crop"
    elif crop_pct == 1:
        crop = f"resize the short side to {size}, centre crop {size} (no crop of a {size} x {size} image)"
    else:
        crop = f"resize to {round(size / crop_pct)}, centre crop {size} (crop_pct {crop_pct:g})"
    normalize = str(config.get("normalize") or "imagenet")
    if normalize.lower() in NORMALIZATIONS:
        return f"{crop}, {_NORMALIZATION_NAMES.get(normalize.lower(), normalize)} mean and std"
    mean, std = normalization(normalize)
    return f"{crop}, mean {', '.join(f'{m:g}' for m in mean)} and std {', '.join(f'{s:g}' for s in std)}"


def _usage(repo_id: Optional[str], config: dict[str, Any]) -> str:
    name = f"hf-hub:{repo_id}" if repo_id else "hf-hub:USER/MODEL"
    preprocessing = _preprocessing(config)
    repo = repo_id or "USER/MODEL"
    imports, intro = "import timm\nimport torch\nfrom PIL import Image\n\n", ""
    load = f'model = timm.create_model("{name}", pretrained=True, num_classes=0).eval()\n'
    if config.get("stem") == "cifar":  # stock timm rebuilds a stride-2 stem from config.json
        imports, load = "import hnmix\n" + imports, f'model = hnmix.load_encoder("{repo}").eval()\n'
        intro = ("This encoder has the CIFAR stem (conv1 3x3 stride 1, no max-pool), which stock timm cannot rebuild "
                 "from `config.json` (its stem options all have stride 2): hnmix's `load_encoder` gives the timm "
                 "model with that stem. ")
    return (
        f"{intro}The preprocessing ({preprocessing}) is recorded in `config.json`; timm resolves it:\n\n"
        "```python\n"
        f"{imports}{load}"
        "data_config = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**data_config, is_training=False)\n"
        'image = Image.open("image.jpg").convert("RGB")\n'
        "with torch.no_grad():\n"
        "    features = model(transform(image).unsqueeze(0))  # [1, model.num_features]\n"
        "```\n\n"
        f'`hnmix.load_encoder("{repo}")` loads every encoder hnmix exports, with the CIFAR stem or not; '
        "a local folder works too.\n"
    )
