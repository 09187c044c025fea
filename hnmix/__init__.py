"""hnmix: MoCo with hard negative mixing (MoCHi) on Accelerate, timm and `datasets`.

The package is organised by layer; each uses only the layers listed after it:

- `hnmix.bench`: benchmarks (`python -m hnmix.bench`), a tool on top of everything.
- `hnmix.plot`, `hnmix.preview`, `hnmix.analyze`: the pictures' command lines (tools; no training).
- `hnmix.train`: the trainer (`python -m hnmix.train`): options, the loop, checkpoints, signals.
- `hnmix.evaluate`: frozen-feature evaluation (`python -m hnmix.evaluate`) and the kNN monitor.
- `hnmix.hub`: the encoder in timm's layout, its model card, background Hub pushes.
- `hnmix.pictures`: matplotlib figures (training curves, the preview grid, the hardness analysis).
- `hnmix.data`: datasets, images, the two augmented views, the DataLoader.
- `hnmix.moco`, `hnmix.mixing`, `hnmix.key_queue`, `hnmix.split_bn`, `hnmix.distributed`, `hnmix.backbones`:
  the method (the model, MoCHi's logits, the queue, split BatchNorm, the batch shuffle, the timm
  backbone with its stem).
- `hnmix.errors`: the error types a user can cause, shared by every layer.

`hnmix.load_encoder(DIR or user/name)` loads an encoder exported by hnmix as a timm model,
whatever its stem (`hnmix.hub.load`).
"""

__all__ = ["load_encoder"]


def __getattr__(name: str):
    """`hnmix.load_encoder` (`hnmix.hub.load`), imported on first use: `import hnmix.moco` and the
    trainer's subprocesses do not pay for timm's hub code."""
    if name == "load_encoder":
        from hnmix.hub.load import load_encoder

        return load_encoder
    raise AttributeError(f"module 'hnmix' has no attribute {name!r}")
