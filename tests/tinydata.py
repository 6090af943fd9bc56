"""Tiny datasets in the documented on-disk formats, built from Flickr8k-layout caption files.

`write_flickr8k_like` makes such files anywhere (the synthetic generator in Flickr8k's layout);
the real Flickr8k fixtures have the same layout. Used by test_tokenizer/test_data/test_train:
captions.csv + captions.json as `captioner clean` writes them and a features/<encoder>/ cache
(features.npy, ids.txt, meta.json) as a hand-made cache dropped in from another model would be.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from captioner import demo
from captioner.config import Config, load_config
from captioner.text import normalize

SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


# Images per split of the Flickr8k-like folder: enough for every test that takes "the first N".
LIKE_SIZES = {"train": 48, "dev": 12, "test": 12}


def write_flickr8k_like(folder: Path) -> Path:
    """folder/raw in Flickr8k's layout, made by the synthetic generator: Flicker8k_Dataset/ with
    every image, Flickr8k_text/ (token file, official split lists) and Kaggle's captions.txt."""
    settings = {f"demo.{split}_images": count for split, count in LIKE_SIZES.items()}
    cfg = load_config(None, (), dataset="demo", **{"data.data_dir": str(folder), **settings})
    raw = demo.generate(cfg)
    token = (raw / "Flickr8k_text" / "Flickr8k.token.txt").read_text(encoding="utf-8")
    with open(raw / "captions.txt", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(
            (key.rsplit("#", 1)[0], text)
            for key, text in (line.split("\t", 1) for line in token.splitlines())
        )
    return raw


def fixture_captions(fixtures: Path) -> dict[str, list[str]]:
    """{image: [raw captions]} from the real Flickr8k.token.txt."""
    captions: dict[str, list[str]] = {}
    text = (fixtures / "Flickr8k_text" / "Flickr8k.token.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        key, raw = line.split("\t", 1)
        captions.setdefault(key.rsplit("#", 1)[0], []).append(raw)
    return captions


def write_captions(cfg: Config, fixtures: Path, sizes: dict[str, int]) -> pd.DataFrame:
    """captions.csv/json with the first sizes[split] images of each official split."""
    captions = fixture_captions(fixtures)
    rows = []
    for split, count in sizes.items():
        names = (fixtures / "Flickr8k_text" / SPLIT_FILES[split]).read_text().split()[:count]
        rows += [(name, split, normalize(raw), raw) for name in names for raw in captions[name]]
    frame = pd.DataFrame(rows, columns=["image", "split", "caption", "raw"])
    cfg.dataset_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(cfg.captions_csv, index=False)
    meta = {
        "format": "flickr8k",
        "split": "official",
        "seed": cfg.seed,
        "images_dir": "raw/Flicker8k_Dataset",
        "counts": {"captions": len(frame)},
    }
    cfg.captions_csv.with_name("captions.json").write_text(json.dumps(meta))
    return frame


def write_features(
    features_dir: Path,
    ids: list[str],
    dim: int,
    seed: int = 0,
    grid: tuple[int, int] | None = None,
    dtype: str = "float32",
) -> np.ndarray:
    """A feature cache of random rows, one per id: pooled (N, dim), or with `grid` (H, W) a grid
    cache (N, H, W, dim); meta.json written last."""
    shape = (len(ids), dim) if grid is None else (len(ids), *grid, dim)
    features = np.random.default_rng(seed).normal(size=shape).astype(dtype)
    features_dir.mkdir(parents=True, exist_ok=True)
    np.save(features_dir / "features.npy", features)
    (features_dir / "ids.txt").write_text("".join(f"{name}\n" for name in ids))
    (features_dir / "bad_images.txt").write_text("")
    meta = {
        "encoder": features_dir.name,
        "weights": "hand-made",
        "dim": dim,
        "count": len(ids),
        "dtype": dtype,
    }
    if grid is not None:
        meta |= {"layout": "grid", "grid": list(grid)}
    (features_dir / "meta.json").write_text(json.dumps(meta))
    return features


def write_dataset(
    cfg: Config,
    fixtures: Path,
    sizes: dict[str, int],
    dim: int = 7,
    drop: int = 0,
    grid: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """captions + a feature cache for cfg.features.encoder (a grid cache with `grid` (H, W));
    the last `drop` images get no row."""
    frame = write_captions(cfg, fixtures, sizes)
    ids = list(dict.fromkeys(frame["image"]))
    write_features(cfg.features_dir, ids[: len(ids) - drop], dim, seed=cfg.seed, grid=grid)
    return frame
