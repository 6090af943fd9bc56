"""Where an attention model looked: the map of each word of a caption, and that map on the image.

decode.decode(..., attention=True) gives each caption's maps as (words, L) with L = H * W regions
in row-major order, one row per emitted word (decode.py); the run's features_meta.json "grid"
gives (H, W). `attend_features` / `attend_files` turn them into an `Attended` per image: the
words and their (words, H, W) maps (None for a run without attention, the merge model).

`overlay` draws one map on its image in the manner of Show, Attend and Tell's figures: the map is
upsampled smoothly (bicubic) to the image, region (i, j) covering the i-th of H rows and j-th of
W columns of the whole image (the encoder sees the whole image resized to a square), and the
image is darkened where the word did not look. Only numpy and Pillow: the web page uses it
without the plots extra; the captioned figures (attention_plots.py) need matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioner.errors import CaptionerError

ALL_WORDS = "all words"  # word_choices: every word's map at once
DIM = 0.25  # brightness where the map is 0; 1 where it is at its maximum
OVERLAY_SIDE = 320  # overlays are drawn on the image shrunk to this longest side (pixels)


@dataclass(frozen=True)
class Attended:
    """One caption and where each of its words looked."""

    words: tuple[str, ...]  # as emitted, in order (no <end>)
    maps: np.ndarray | None  # (len(words), H, W) float32, each map sums to 1; None: no attention

    @property
    def caption(self) -> str:
        return " ".join(self.words)


def run_grid(run: Any) -> tuple[int, int] | None:
    """(H, W) of the run's grid features (its features_meta.json), None for pooled ones."""
    from captioner.feature_cache import layout_of

    return layout_of(run.features_meta)[1]


def attend_features(run: Any, features: np.ndarray, decoding: Any = None) -> list[Attended]:
    """Captions and maps of a LoadedRun for rows of its encoder ((N, D) or (N, H, W, C)), decoded
    with `decoding` (loaded_run.DecodeSettings; default: the run's own settings)."""
    ids, maps = run.decode_features(features, decoding, attention=True)
    tokens = run.vocab.tokens
    if maps is None or not ids:
        return [Attended(tuple(tokens[i] for i in words), None) for words in ids]
    grid = run_grid(run)
    regions = maps[0].shape[1]
    if grid is None or grid[0] * grid[1] != regions:
        raise CaptionerError(
            f"{run.run_dir / 'features_meta.json'}: grid {grid} does not match the model's "
            f"{regions} attention regions; the run is inconsistent, train it again"
        )
    return [
        Attended(tuple(tokens[i] for i in words), word_maps.reshape(len(words), *grid))
        for words, word_maps in zip(ids, maps, strict=True)
    ]


def attend_files(
    run: Any, paths: Sequence[str | Path], decoding: Any = None
) -> tuple[list[tuple[str, Attended]], list[tuple[str, str]]]:
    """([(path, Attended)] for readable images, [(path, reason)] for the others), with the run's
    own encoder (load_run with its encoder)."""
    features, ok_paths, failures = run.encode_files(paths)
    return list(zip(ok_paths, attend_features(run, features, decoding), strict=True)), failures


def upsample(attention_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) map -> (height, width) float32 for an image of size (width, height), smooth
    (bicubic, each region's value at its centre), scaled so its maximum is 1 (0 where it is 0)."""
    values = np.asarray(attention_map, np.float32)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0 or not np.isfinite(peak):
        return np.zeros(size[::-1], np.float32)
    resized = Image.fromarray(values / peak).resize(size, Image.Resampling.BICUBIC)  # mode F
    return np.clip(np.asarray(resized), 0.0, 1.0)  # bicubic overshoots a little at the edges


def overlay(image: Image.Image, attention_map: np.ndarray, side: int = OVERLAY_SIDE) -> Image.Image:
    """The image (shrunk to `side` pixels at most) bright where the map is high, dark elsewhere."""
    image = image.convert("RGB")
    image.thumbnail((side, side))
    light = upsample(attention_map, image.size)[..., None]  # (height, width, 1) in [0, 1]
    pixels = np.asarray(image, np.float32) * (DIM + (1 - DIM) * light)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def word_choices(attended: Attended) -> list[str]:
    """What a word picker (the web page's) offers: every word at once, or one word, numbered
    (words repeat)."""
    return [ALL_WORDS] + [f"{n}. {word}" for n, word in enumerate(attended.words, 1)]


def word_overlays(
    image: Image.Image, attended: Attended, choice: str
) -> list[tuple[Image.Image, str]]:
    """[(the image with a word's map on it, the word)] for the picker's choice: every word's
    (ALL_WORDS) or the one picked."""
    words = list(enumerate(attended.words))
    if choice != ALL_WORDS:
        words = [words[word_choices(attended).index(choice) - 1]]
    return [(overlay(image, attended.maps[n]), word) for n, word in words]


def png_names(paths: Sequence[str]) -> dict[str, str]:
    """A PNG file name per image path: its stem + .png, then -2, -3, ... for a stem already
    taken (photos/a.jpg and more/a.png both named a), so no image's figure replaces another's."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem = Path(path).stem or "image"
        name, count = f"{stem}.png", 1
        while name.lower() in taken:
            count += 1
            name = f"{stem}-{count}.png"
        taken.add(name.lower())
        names[path] = name
    return names
