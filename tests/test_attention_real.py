"""The attention is real: trained on synthetic scenes, the map of the word naming a shape's colour
lies on that shape, at the place its caption names, and the background's word looks elsewhere.

The demo generator (src/captioner/demo.py) draws one saturated shape (or two) on a grey
background, at one of five named places ("on the left" = centre at x 0.28, ...), and says so in
every caption. A small attention model is trained through `train.train` on a grid cache of
those images made the simplest way that keeps where things are (`cell_grid`: each image cut into
8x8 cells, each cell its mean colour and its centre's coordinates; a CNN's grid carries position
through padding and receptive fields, these cells need it said). Its test captions are then
decoded with their maps (attention_maps.attend_features, the path `caption --attention`, the
plots and the app take), each map upsampled to the image as the figures draw it, and measured
against the shape's pixels, found in the image itself: the saturated ones (the backgrounds are
grey).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captioner import clean, demo, train
from captioner.attention_maps import attend_features, upsample
from captioner.captions import load_captions
from captioner.feature_cache import write_cache
from captioner.loaded_run import load_run

CELLS = 8  # the grid: 8 x 8 cells of 8 x 8 pixels of a 64-pixel image
BACKGROUND_WORDS = set(demo.BACKGROUNDS)
SATURATED = 60  # max - min of a pixel's RGB: the shapes' colours are far above, greys far below


def cell_grid(path) -> np.ndarray:
    """(CELLS, CELLS, 5) float32: per cell its mean RGB in [0, 1] and its centre's (x, y) in
    [-1, 1] (row-major cells: (i, j) is row i from the top, column j from the left)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255  # (S, S, 3)
    side = pixels.shape[0] // CELLS
    colour = pixels.reshape(CELLS, side, CELLS, side, 3).mean(axis=(1, 3))
    y, x = np.meshgrid(*[np.linspace(-1, 1, CELLS)] * 2, indexing="ij")
    return np.concatenate([colour, x[..., None], y[..., None]], axis=-1).astype(np.float32)


def shape_mask(path) -> np.ndarray:
    """(S, S) bool: the pixels of the image's shapes."""
    pixels = np.asarray(Image.open(path).convert("RGB"), np.int16)
    return (pixels.max(axis=-1) - pixels.min(axis=-1)) > SATURATED


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on a cell-grid cache of 500 synthetic images, and its test images."""
    root = tmp_path_factory.mktemp("attention-real")
    from captioner.config import load_config

    settings = {
        "data.data_dir": str(root / "data"),
        "train.runs_dir": str(root / "runs"),
        "demo.train_images": 500,
        "demo.dev_images": 50,
        "demo.test_images": 80,
        "demo.image_size": 8 * CELLS,
        "features.encoder": "cells",  # a cache of one's own, dropped in
        "tokenizer.min_count": 1,
        "model.decoder": "attention",
        "model.units": 64,
        "model.embed_dim": 32,
        "model.attention_units": 32,
        "model.dropout": 0.0,
        "model.normalize_features": True,
        # The regulariser asks each of the 64 cells to be looked at about once per caption of
        # ~11 words: it spreads every map (measured: the shape word's mass on its shape stays at
        # the shape's share of the image with it). Show, Attend and Tell's words see 196 regions.
        "model.doubly_stochastic": 0.0,
        "train.learning_rate": 0.02,
        "train.epochs": 8,
        "train.dev_scores": 0,
        "train.name": "cells",
        "decode.beam": 1,
    }
    cfg = load_config(None, (), dataset="demo", **settings)
    demo.generate(cfg)
    clean.clean(cfg)
    frame, images_dir = load_captions(cfg)
    names = list(dict.fromkeys(frame["image"]))
    rows = np.stack([cell_grid(images_dir / name) for name in names])
    meta = {"encoder": "cells", "weights": "none", "dim": 5, "dtype": "float32"}
    cfg.features_dir.mkdir(parents=True)
    write_cache(cfg.features_dir, [(rows, names, [])], meta | {"layout": "grid", "grid": [8, 8]})
    run = load_run(train.train(cfg), with_encoder=False)
    test = frame[frame["split"] == "test"]
    references = test.groupby("image", sort=False)["caption"].first()
    return run, rows[[names.index(name) for name in references.index]], references, images_dir


def mass_on(mask: np.ndarray, attention_map: np.ndarray) -> float:
    """The share of the upsampled map that lies on the mask's pixels."""
    light = upsample(attention_map, mask.shape[::-1])
    return float(light[mask].sum() / light.sum())


def centre(attention_map: np.ndarray, side: int) -> np.ndarray:
    """(x, y) of the upsampled map's centre of mass, as fractions of the image side."""
    light = upsample(attention_map, (side, side))
    y, x = np.mgrid[0:side, 0:side] + 0.5
    return np.array([(light * x).sum(), (light * y).sum()]) / light.sum() / side


@pytest.mark.slow  # trains 8 epochs on 500 images: ~45 s (25 s of CPU) on 2 busy cores
def test_a_shapes_word_looks_at_that_shape_at_the_named_place(trained):
    """Of one-shape test images: the map of the colour word the caption gives the shape.

    Measured with seeds 0, 1 and 2: on the shape .82/.84/.81 of the map, the shape being 11-12%
    of the image (105x/96x/90x denser there than elsewhere, median per caption), nearest the
    named place 84/91/88%, background words .32/.04/.18 on the shape; the bounds below leave a
    clear margin. The shape's kind word (circle, square, triangle) looked at it less reliably
    (.39 to .80 over those seeds, earlier code): 8 x 8 cells barely show a small shape's outline.
    """
    run, features, references, images_dir = trained
    attended = attend_features(run, features)
    places = list(demo.POSITIONS)
    on_shape, share, background, nearest = [], [], [], []
    for (name, reference), caption in zip(references.items(), attended, strict=True):
        if " and " in reference or "next to" in reference:  # two shapes: not measured here
            continue
        mask = shape_mask(images_dir / name)
        place = next(p for p in places if p in reference)  # the position the references name
        for word, attention_map in zip(caption.words, caption.maps, strict=True):
            if word in demo.COLOURS:
                on_shape.append(mass_on(mask, attention_map))
                share.append(mask.mean())
                where = centre(attention_map, mask.shape[0])
                distances = [np.hypot(*(where - demo.POSITIONS[p])) for p in places]
                nearest.append(places[int(np.argmin(distances))] == place)
            elif word in BACKGROUND_WORDS:
                background.append(mass_on(mask, attention_map))
    on_shape, share = np.array(on_shape), np.array(share)
    contrast = np.median((on_shape / share) / ((1 - on_shape) / (1 - share)))
    print(
        f"\n{len(on_shape)} colour words: {on_shape.mean():.2f} of the map on the shape, which is "
        f"{share.mean():.2f} of the image ({contrast:.0f}x denser there); nearest the named "
        f"place {np.mean(nearest):.0%}; background words: {np.mean(background):.2f} on the shape"
    )
    assert len(on_shape) >= 30 and len(background) >= 30
    assert on_shape.mean() > 0.5  # most of its mass on the shape...
    assert contrast > 5  # ...clearly more per pixel than on the rest of the image...
    assert np.mean(nearest) > 0.75  # ...at the place the captions name...
    assert np.mean(background) < on_shape.mean() - 0.25  # ...and for this word, not for all
