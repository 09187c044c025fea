"""Run under `accelerate launch --num_processes 2`: feature extraction, the kNN monitor and the CLI on 2 ranks.

Writes to OUT:
- rank{R}.json: the world size; the labels `extract_features` gathered from a 37-image set whose
  label is the row index (37 is not a multiple of 2 processes x batch 4, so Accelerate pads the last
  batch); whether the backbone's training mode, this rank's own BatchNorm buffers and the global RNG
  state came back; the monitor's result; the CLI's exit code.
- rank0.pt (rank 0 only): the gathered features, the same features computed by rank 0 alone without
  Accelerate, and the monitor's result computed by rank 0 alone.
- cli.json: `python -m hnmix.evaluate test_resnet ...` run on both ranks.
"""

import json
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.evaluate.cli import main as evaluate_main
from hnmix.evaluate.features import EvalImages, extract_features, make_eval_loader
from hnmix.evaluate.monitor import KnnMonitor
from hnmix.evaluate.probes import knn_accuracy
from hnmix.evaluate.splits import load_eval_splits

SIZE, BATCH, IMG, K = 37, 4, 32, 5
CLI_ARGS = ["test_resnet", "--dataset", "synthetic", "--synthetic_size", str(SIZE), "--img_size", str(IMG),
            "--batch_size", str(BATCH), "--num_workers", "0", "--knn_k", str(K), "--seed", "0"]


def features_alone(backbone: torch.nn.Module, images: EvalImages) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of every image, computed by this process alone (no Accelerate, no collectives)."""
    backbone.eval()
    features, labels = [], []
    with torch.no_grad():
        for batch, batch_labels in make_eval_loader(images, batch_size=BATCH, num_workers=0):
            features.append(backbone(batch))
            labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    reference = {name: t.clone() for name, t in backbone.state_dict().items()}  # rank 0's buffers, on every rank
    # Ranks of a training run hold different BatchNorm statistics; evaluation must use rank 0's.
    for name, buffer in backbone.named_buffers():
        if name.endswith("running_mean"):
            buffer.add_(float(rank))
    own_buffers = {name: b.clone() for name, b in backbone.named_buffers()}

    indexed = make_synthetic_dataset(SIZE, seed=0, image_size=IMG).remove_columns("label")
    indexed = indexed.add_column("label", list(range(SIZE)))  # label = row index
    images = EvalImages(indexed, image_column="image", label_column="label", img_size=IMG)
    loader = accelerator.prepare(make_eval_loader(images, batch_size=BATCH, num_workers=0))
    backbone.train()
    rng = torch.get_rng_state()
    features, labels = extract_features(backbone, loader, accelerator)
    rng_untouched = torch.equal(torch.get_rng_state(), rng)
    training_restored = backbone.training
    buffers_restored = all(torch.equal(b, own_buffers[name]) for name, b in backbone.named_buffers())

    splits = load_eval_splits("synthetic", synthetic_size=SIZE, seed=0)  # bank: train split, queries: validation
    monitor = KnnMonitor.from_splits(splits, accelerator, img_size=IMG, batch_size=BATCH, num_workers=0, k=K)
    result = monitor.evaluate(backbone, accelerator)

    cli_rc = evaluate_main([*CLI_ARGS, "--json", str(out / "cli.json")])
    record = {"rank": rank, "world": world, "labels": labels.tolist(), "num_features": list(features.shape),
              "training_restored": training_restored, "buffers_restored": buffers_restored,
              "rng_untouched": rng_untouched,
              "monitor": result, "cli_rc": cli_rc}
    (out / f"rank{rank}.json").write_text(json.dumps(record))

    if rank == 0:
        alone = timm.create_model("test_resnet", num_classes=0)
        alone.load_state_dict(reference)
        alone_features, _ = features_alone(alone, images)

        def split_images(dataset):
            return EvalImages(dataset, image_column="image", label_column="label", img_size=IMG)

        bank = features_alone(alone, split_images(splits.train))
        queries = features_alone(alone, split_images(splits.held_out))
        monitor_alone = knn_accuracy(*bank, *queries, num_classes=splits.num_classes, k=K)
        torch.save({"gathered": features.cpu(), "alone": alone_features, "monitor_alone": monitor_alone},
                   out / "rank0.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
