"""Drawing pieces the plots share: PNG writing, thumbnails, image grids, CSV reading.

Imported only by plots.py, after it has checked that matplotlib (the plots extra) is installed.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from captioner.errors import CaptionerError
from captioner.io import atomic_write_bytes

THUMBNAIL = 128  # pixels, longest side


def save(figure: Figure, path: Path) -> Path:
    """Render to PNG in memory, then write atomically: a kill never leaves half a file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def thumbnail(path: Path, size: int = THUMBNAIL) -> Image.Image | None:
    """A small RGB copy of an image, or None when the file is missing or unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return image
    except (OSError, UnidentifiedImageError):
        return None


def show(axes, path: Path, size: int = THUMBNAIL) -> None:
    """Draw an image without ticks or frame; a grey 'not readable' box when it cannot be read.

    The axis stays on (only invisible) so an x-label under the image takes part in the layout.
    """
    axes.set_xticks([])
    axes.set_yticks([])
    axes.spines[:].set_visible(False)
    image = thumbnail(path, size)
    if image is None:
        axes.text(0.5, 0.5, f"{path.name}\nnot readable", ha="center", va="center", fontsize=7)
        axes.set_facecolor("0.9")
    else:
        axes.imshow(image)


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV as strings and numbers (a caption "nan" stays text), or a one-line error."""
    try:
        return pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CaptionerError(f"{path}: unreadable CSV ({error}); write it again") from None


def wrap(text: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def image_grid(cells: Sequence[tuple[Path, str]], title: str, columns: int = 3) -> Figure:
    """Images in a grid, each with a block of text underneath. cells = [(image path, text)]."""
    rows = max(1, -(-len(cells) // columns))
    figure = Figure(figsize=(3.6 * columns, 4.0 * rows), layout="constrained")
    figure.suptitle(title, fontsize=13)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, cell in zip(grid.flat, list(cells) + [None] * (grid.size - len(cells)), strict=True):
        if cell is None:
            axes.set_axis_off()
            continue
        path, text = cell
        show(axes, path, size=320)
        axes.set_title(path.name, fontsize=8, color="0.4")
        axes.set_xlabel(text, loc="left", multialignment="left", fontsize=9)
    return figure
