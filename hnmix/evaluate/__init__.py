"""The evaluation layer: frozen-feature evaluation (`python -m hnmix.evaluate`) and the kNN monitor.

- `models`: a checkpoint, an exported encoder, a Hub model or a timm baseline as a backbone.
- `splits`: the labelled splits (train, held-out, test). `features`: evaluation images and the
  features of a backbone over them, gathered across processes.
- `probes`: the kNN classifier and the fast linear probe (pure tensor math, precomputed features).
- `lincls`: the papers' linear evaluation (SGD on augmented views through the frozen backbone).
- `monitor`: the kNN monitor the trainer runs. `cli`: the command line.
"""
