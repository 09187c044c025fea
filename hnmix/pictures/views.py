"""The preview grid: for each image, the original with both crop boxes, and each view's crop (the
geometric half of the augmentation) and final view (after the photometric half).

Images are placed pixel for pixel (`Figure.figimage`, no resampling): a view of side S fills a
cell of S x `scale` pixels, each of its pixels repeated `scale` times in both directions, so that
small views stay visible and the grid shows exactly the pixels the encoder is fed.
`GridLayout.cell_box` says where each cell is in the PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from hnmix.data.geometric import Crop

COLUMNS = ("original\n(query box blue, key orange)", "query crop\n(geometric half)", "query view\n(photometric half)",
           "key crop\n(geometric half)", "key view\n(photometric half)")
BOX_COLOURS = ((31, 119, 180), (255, 127, 14))  # matplotlib's C0 and C1: query, key
MIN_CELL = 128  # pixels; smaller views are enlarged by a whole factor
DPI = 100


class PreviewRow(NamedTuple):
    """One image of the grid.

    original: the upright RGB image. crops: the (query, key) boxes in its pixels; flips: whether
    each view was mirrored. crop_q, view_q, crop_k, view_k: uint8 [3, S, S] (the views
    de-normalised for display). caption: a few words on the image (index, class).
    """

    original: Image.Image
    crops: tuple[Crop, Crop]
    flips: tuple[bool, bool]
    crop_q: torch.Tensor
    view_q: torch.Tensor
    crop_k: torch.Tensor
    view_k: torch.Tensor
    caption: str


class GridLayout(NamedTuple):
    """Pixel geometry of a grid of `rows` images of side `img_size`: the PNG is width x height."""

    rows: int
    img_size: int
    scale: int
    left: int = 170  # row captions
    top: int = 120  # title (three lines: data, where the photometric half runs, the augmentation) and column headers
    gap: int = 12

    @classmethod
    def of(cls, rows: int, img_size: int) -> "GridLayout":
        return cls(rows, img_size, max(1, math.ceil(MIN_CELL / img_size)))

    @property
    def cell(self) -> int:
        return self.img_size * self.scale

    @property
    def width(self) -> int:
        return self.left + len(COLUMNS) * (self.cell + self.gap)

    @property
    def height(self) -> int:
        return self.top + self.rows * (self.cell + self.gap)

    def cell_box(self, row: int, column: int) -> tuple[int, int]:
        """(left, top) of cell (row, column) in PNG pixels, from the top-left corner."""
        return self.left + column * (self.cell + self.gap), self.top + row * (self.cell + self.gap)


def enlarge(view: torch.Tensor, scale: int) -> np.ndarray:
    """uint8 [3, S, S] -> [S*scale, S*scale, 3], each pixel repeated `scale` x `scale` times."""
    pixels = view.permute(1, 2, 0).numpy()
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)


def original_with_boxes(row: PreviewRow, cell: int) -> np.ndarray:
    """The original fitted into a cell x cell square (aspect kept, black borders), both crop
    boxes drawn: [cell, cell, 3] uint8."""
    image = row.original
    factor = cell / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    fitted = image.resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (cell, cell))
    offset = ((cell - size[0]) // 2, (cell - size[1]) // 2)
    canvas.paste(fitted, offset)
    draw = ImageDraw.Draw(canvas)
    for crop, colour, width in zip(row.crops, BOX_COLOURS, (3, 2)):
        left, top = offset[0] + crop.left * factor, offset[1] + crop.top * factor
        draw.rectangle([left, top, left + crop.width * factor - 1, top + crop.height * factor - 1],
                       outline=colour, width=width)
    return np.asarray(canvas)


def views_figure(rows: Sequence[PreviewRow], *, title: str):
    """The grid (a matplotlib Figure of GridLayout.of(len(rows), S).width x height pixels at DPI)."""
    from matplotlib.figure import Figure

    img_size = rows[0].crop_q.shape[-1]
    layout = GridLayout.of(len(rows), img_size)
    figure = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI, facecolor="white")
    figure.text(0.5, 1 - 14 / layout.height, title, ha="center", va="top", fontsize=12)

    def place(array: np.ndarray, row: int, column: int) -> None:
        left, top = layout.cell_box(row, column)
        # figimage counts from the bottom-left corner.
        figure.figimage(array, xo=left, yo=layout.height - top - array.shape[0], origin="upper")

    for column, header in enumerate(COLUMNS):
        left, _ = layout.cell_box(0, column)
        figure.text((left + layout.cell / 2) / layout.width, 1 - (layout.top - 8) / layout.height, header,
                    ha="center", va="bottom", fontsize=8.5, linespacing=1.3)
    for index, row in enumerate(rows):
        place(original_with_boxes(row, layout.cell), index, 0)
        for column, view in enumerate((row.crop_q, row.view_q, row.crop_k, row.view_k), start=1):
            place(enlarge(view, layout.scale), index, column)
        _, top = layout.cell_box(index, 0)
        flips = "\n".join(f"{name}: {'flipped' if flip else 'not flipped'}" for name, flip in zip(("query", "key"), row.flips))
        figure.text(8 / layout.width, 1 - (top + layout.cell / 2) / layout.height, f"{row.caption}\n{flips}",
                    ha="left", va="center", fontsize=8.5, linespacing=1.4)
    return figure


def draw_views(rows: Sequence[PreviewRow], path: str | Path, *, title: str) -> Path:
    """Write the grid of `rows` as a PNG at `path`; returns it."""
    path = Path(path)
    views_figure(rows, title=title).savefig(path, format="png", dpi=DPI)
    return path
