"""Figures of where an attention run looked (optional extra `plots`), as Show, Attend and Tell drew
them: the image, then the image once per word with that word's map on it, the word as title.

`write_attention_png` is one image's figure (`captioner caption --attention DIR`);
`attention_examples` is the page of test images `captioner plot --run` adds for attention runs.
The maps and the overlay are attention_maps.py's (numpy and Pillow only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from captioner.errors import CaptionerError

try:  # the optional extra: one readable line instead of an ImportError traceback
    from matplotlib.figure import Figure
except ImportError:
    raise CaptionerError(
        "attention figures need matplotlib; pip install 'captioner[plots]'"
    ) from None

from captioner import plot_figures as figures
from captioner.attention_maps import ALL_WORDS, Attended, attend_features, word_overlays

PANEL = 2.0  # inches per image panel
COLUMNS = 6  # panels per row of a one-image figure
EXAMPLES = 4  # test images on the plot page


def draw_attention(figure, image: Image.Image, attended: Attended, columns: int) -> None:
    """Into a Figure or SubFigure: the image, then one panel per word (`columns` per row)."""
    if attended.maps is None:
        raise CaptionerError("a caption without attention maps (a merge run) has no figure")
    panels = [(image.copy(), "")] + word_overlays(image, attended, ALL_WORDS)
    rows = -(-len(panels) // columns)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, panel in zip(grid.flat, panels + [None] * (grid.size - len(panels)), strict=True):
        axes.set_axis_off()
        if panel is not None:
            picture, word = panel
            picture.thumbnail((320, 320))
            axes.imshow(picture)
            axes.set_title(word, fontsize=11)


def attention_figure(image_path: Path, attended: Attended, title: str) -> Figure:
    """One image's figure: the image, then one panel per word of its caption."""
    image = _open(image_path)
    columns = min(COLUMNS, len(attended.words) + 1)
    rows = -(-(len(attended.words) + 1) // columns)
    figure = Figure(figsize=(PANEL * columns, PANEL * rows + 0.6), layout="constrained")
    figure.suptitle(f"{title}\n{figures.wrap(attended.caption, 90)}", fontsize=11)
    draw_attention(figure, image, attended, columns)
    return figure


def write_attention_png(out: Path, image_path: Path, attended: Attended, title: str) -> Path:
    """attention_figure written to `out` as a PNG (atomically)."""
    return figures.save(attention_figure(image_path, attended, title), out)


def attention_examples(
    run_dir: Path, images_dir: Path, out: Path, data_dir: str | None = None, count: int = EXAMPLES
) -> Path:
    """The first `count` test images of an attention run, one row each: the image and a panel per
    word of its caption (decoded with the run's settings from its feature cache)."""
    from captioner.config import replace
    from captioner.evaluate import split_references, split_rows
    from captioner.loaded_run import load_run

    run = load_run(run_dir, with_encoder=False)
    if data_dir is not None:
        run.cfg = replace(run.cfg, **{"data.data_dir": data_dir})
    images, cache, rows = split_rows(run, split_references(run, "test"))
    images = images[:count]
    attended = attend_features(run, cache.features[rows[: len(images)]])
    if attended and attended[0].maps is None:
        raise CaptionerError(f"{run_dir}: a {run.cfg.model.decoder} run has no attention maps")
    columns = 1 + max(len(a.words) for a in attended)
    figure = Figure(
        figsize=(PANEL * 0.8 * columns, PANEL * 0.9 * len(images) + 0.5), layout="constrained"
    )
    figure.suptitle(f"Where each word looked: test images ({run_dir.name})", fontsize=13)
    for subfigure, name, caption in zip(_rows(figure, len(images)), images, attended, strict=True):
        draw_attention(subfigure, _open(images_dir / name), caption, columns)
    return figures.save(figure, out)


def _rows(figure: Figure, count: int) -> Sequence[Any]:
    subfigures = figure.subfigures(count, 1, squeeze=False)
    return list(subfigures[:, 0])


def _open(path: Path) -> Image.Image:
    """The image as RGB, or a one-line error naming it."""
    image = figures.thumbnail(Path(path), size=1024)
    if image is None:
        raise CaptionerError(f"{path}: not a readable image")
    return image
