"""hnmix: MoCo with hard negative mixing (MoCHi) on Accelerate, timm and `datasets`.

The package is organised by layer; each uses only the layers listed after it:

- `hnmix.bench`: benchmarks (`python -m hnmix.bench`), a tool on top of everything.
- `hnmix.plot`, `hnmix.preview`, `hnmix.analyze`: the pictures' command lines (tools; no training).
- `hnmix.train`: the trainer (`python -m hnmix.train`): options, the loop, checkpoints, signals.
- `hnmix.evaluate`: frozen-feature evaluation (`python -m hnmix.evaluate`) and the kNN monitor.
- `hnmix.hub`: the encoder in timm's layout, its model card, background Hub pushes.
- `hnmix.pictures`: matplotlib figures (training curves, the preview grid, the hardness analysis).
- `hnmix.data`: datasets, images, the two augmented views, the DataLoader.
- `hnmix.moco`, `hnmix.mixing`: the method (the model, the queue, MoCHi's logits).
- `hnmix.errors`: the error types a user can cause, shared by every layer.
"""
