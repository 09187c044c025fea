"""The data layer: `--dataset` through `datasets`, images as RGB, and the two augmented views.

- `sources`: a Hub id, a local folder, an image folder, `save_to_disk` or `synthetic` (`synthetic`)
  as a `datasets.Dataset`, and its image and label columns.
- `images`: opening cells lazily, JPEG decoding, any mode to RGB.
- `geometric`: the crops and flips, per image in the DataLoader workers (uint8).
- `transforms`: the per-image photometric half and the evaluation crop (torchvision).
- `photometric`: the photometric half, batched on the accelerator.
- `two_views`: a dataset row as two views with its index and label, the sampler, the DataLoader.

Nothing here knows about MoCo.
"""
