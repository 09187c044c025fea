"""The data layer: `--dataset` through `datasets` (`sources`, `synthetic`), images as RGB
(`images`, `decoded`), the two views' augmentation (`augmentation`: its values; `geometric`: crops
and flips in the workers; `transforms` per image or `photometric` batched: the photometric half),
and the DataLoader (`two_views`, `workers`). Nothing here knows about MoCo.
"""
