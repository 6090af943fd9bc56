"""The captions file: read captions.csv, one split of it, and each image's references.

`captioner clean` writes data/<dataset>/captions.csv (image, split, caption, raw; one row per
caption) and captions.json beside it (how it was made, where the images are). Every later stage
reads them through this module, never through the clean stage.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import escapes_folder, read_json

COLUMNS = ("image", "split", "caption", "raw")


def load_captions(cfg: Config) -> tuple[pd.DataFrame, Path]:
    """captions.csv as strings (image, split, caption, raw) and the folder holding the images."""
    path, meta_path = cfg.captions_csv, cfg.captions_csv.with_name("captions.json")
    if not path.is_file() or not meta_path.is_file():
        raise CaptionerError(
            f"{path}: not found; run `captioner clean --dataset {cfg.data.dataset}` first"
        )
    try:
        # keep_default_na=False: a caption such as "nan" or "null" stays a string
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CaptionerError(f"{path}: unreadable ({error}); run `captioner clean` again") from None
    if set(COLUMNS) - set(frame.columns):
        raise CaptionerError(
            f"{path}: columns must be {', '.join(COLUMNS)}; run `captioner clean` again"
        )
    check_inside(path, frame["image"].unique(), "the images_dir of captions.json")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("images_dir"), str):
        raise CaptionerError(f"{meta_path}: no images_dir; run `captioner clean` again")
    images_dir = Path(meta["images_dir"])
    return frame, images_dir if images_dir.is_absolute() else cfg.dataset_dir / images_dir


def check_inside(path: Path, images, folder: str) -> None:
    """Image names must stay inside the image folder: no absolute path, no `..`."""
    outside = [image for image in dict.fromkeys(images) if escapes_folder(image)]
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise CaptionerError(
            f"{path}: image '{outside[0]}'{more} is outside the image folder; image names "
            f"must be relative to {folder}, without '..'"
        )


def read_split(cfg: Config, split: str) -> pd.DataFrame:
    """The `image` and `caption` columns of one split of captions.csv (see data/README.md)."""
    frame, _ = load_captions(cfg)
    return split_rows(frame, split)


def split_rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    """The `image` and `caption` columns of the rows of one split, in file order."""
    return frame.loc[frame["split"] == split, ["image", "caption"]].reset_index(drop=True)


def references(rows: pd.DataFrame) -> dict[str, list[str]]:
    """{image: its captions} for (image, caption) rows, images in file order."""
    found: dict[str, list[str]] = {}
    for image, caption in zip(rows["image"], rows["caption"], strict=True):
        found.setdefault(image, []).append(caption)
    return found
