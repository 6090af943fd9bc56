"""The clean stage: raw captions in any known format -> captions.csv with clean text and splits.

captions.csv holds one row per caption (image, split, caption, raw); captions.json beside it says
how it was made (format, split, seed, fractions, source files), where the images are and what was
dropped. Splits are made over images, never captions, so no image leaks between train and test.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from captioner import formats
from captioner.captions import COLUMNS, check_inside
from captioner.clean_report import SHOWN, log_summary, statistics, why_none
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import atomic_write_bytes, log, read_json, write_json
from captioner.text import normalize

CLEAN_FORMAT = 2  # bump when captions.csv would come out differently from the same inputs


@dataclass(frozen=True)
class Plan:
    """Which files clean reads: decided before parsing, so a finished result can be reused."""

    format: str
    captions: Path
    split_files: tuple[Path, ...]  # official split files or Karpathy's json, when they are used
    images: Path | None  # bring-your-own image folder (absolute); None: search raw/


def clean(cfg: Config) -> Path:
    """Write cfg.captions_csv and captions.json; return the csv path (reused when up to date)."""
    plan = _plan(cfg)
    settings = _settings(cfg, plan)
    meta_path = cfg.captions_csv.with_name("captions.json")
    if _is_fresh(cfg.captions_csv, meta_path, settings):
        log(f"reusing {cfg.captions_csv}")
        return cfg.captions_csv

    source = formats.read(plan.format, plan.captions)
    check_inside(source.path, [image for image, _ in source.records], "--images")
    frame, dropped = _clean_rows(source)
    if frame.empty:
        raise CaptionerError(f"{source.path}: no usable captions ({why_none(dropped)}); check it")
    split_map, split_used = _split_map(cfg, plan, source, frame["image"])
    frame["split"] = frame["image"].map(split_map)
    unsplit = frame["split"].isna()
    dropped["no_split"] = {
        "images": int(frame.loc[unsplit, "image"].nunique()),
        "captions": int(unsplit.sum()),
    }
    counts = {"images": int(frame["image"].nunique()), "captions": len(frame)}
    frame = frame.loc[~unsplit, list(COLUMNS)]
    if frame.empty:
        raise CaptionerError(
            f"{source.path}: no usable captions (none of its images is a real "
            f"image entry with a caption in the {split_used} split); check it"
        )
    images_dir, found, missing = _locate_images(cfg, plan, set(frame["image"]))

    atomic_write_bytes(cfg.captions_csv, frame.to_csv(index=False).encode("utf-8"))
    counts.update(statistics(frame))
    write_json(
        meta_path,
        {
            **settings,
            "split_used": split_used,
            "images_dir": images_dir,
            "images_found": found,
            "images_missing": missing,
            "counts": counts,
            "dropped": dropped,
        },
    )
    log_summary(cfg, source, split_used, counts, dropped, images_dir, missing)
    return cfg.captions_csv


def random_split(
    images: list[str] | set[str], seed: int, dev_fraction: float, test_fraction: float
) -> dict[str, str]:
    """A seeded split over image names (not captions, not file order): {image: split}."""
    if min(dev_fraction, test_fraction) < 0 or dev_fraction + test_fraction >= 1:
        raise CaptionerError(
            "config data.dev_fraction and data.test_fraction must be >= 0 and "
            f"sum to less than 1 (got {dev_fraction} + {test_fraction})"
        )
    names = sorted(set(images))  # sorted first: the split must not depend on file order
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = round(len(names) * test_fraction)
    n_dev = round(len(names) * dev_fraction)
    return {
        names[index]: "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"
        for rank, index in enumerate(order)
    }


# --- planning ------------------------------------------------------------------------------------
def _plan(cfg: Config) -> Plan:
    data = cfg.data
    if data.split not in ("official", "karpathy", "random"):
        raise CaptionerError(
            f"config data.split must be official, karpathy or random, got '{data.split}'"
        )
    formats.check_format(data.format)
    if data.captions:  # bring your own data
        captions = Path(data.captions).expanduser().resolve()
        images = Path(data.images or captions.parent).expanduser().resolve()
        if not captions.is_file():
            raise CaptionerError(f"{captions}: caption file not found; check --captions")
        if not images.is_dir():
            raise CaptionerError(f"{images}: image folder not found; check --images")
        fmt = formats.detect_format(captions) if data.format == "auto" else data.format
        search_root = cfg.raw_dir if cfg.raw_dir.is_dir() else captions.parent
    elif data.format in ("csv", "coco"):
        raise CaptionerError(f"--format {data.format} needs --captions FILE and --images FOLDER")
    elif not cfg.raw_dir.is_dir():
        raise CaptionerError(
            f"{cfg.raw_dir}: not found; run `captioner download --dataset "
            f"{data.dataset}` first, or pass --format csv --captions FILE "
            "--images FOLDER"
        )
    else:
        images, search_root = None, cfg.raw_dir
        found = formats.find_sources(cfg.raw_dir)
        fmt, captions = formats.choose_source(found, data.format, data.dataset, cfg.raw_dir)
    split_files: tuple[Path, ...] = ()
    if data.split == "karpathy" and fmt != "karpathy":
        wanted = f"dataset_{formats.FAMILY.get(fmt, data.dataset)}.json"
        path = formats.karpathy_file(formats.find_sources(search_root), data.dataset, fmt)
        if path is None:
            raise CaptionerError(
                f"{search_root / wanted}: not found; --split karpathy needs "
                "Karpathy's split file (from caption_datasets.zip, "
                f"{cfg.download.karpathy_url}): put {wanted} in {search_root}"
            )
        split_files = (path,)
    elif data.split == "official" and captions.name == "Flickr8k.token.txt":
        split_files = tuple(
            captions.parent / name
            for name in formats.OFFICIAL_SPLIT_FILES.values()
            if (captions.parent / name).is_file()
        )
    return Plan(fmt, captions, split_files, images)


def _settings(cfg: Config, plan: Plan) -> dict:
    """Everything that decides captions.csv; a recorded copy that matches means "reuse"."""
    sources = []
    for path in (plan.captions, *plan.split_files):
        stat = path.stat()
        sources.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {
        "clean_format": CLEAN_FORMAT,
        "format": plan.format,
        "split": cfg.data.split,
        "seed": cfg.seed,
        "dev_fraction": cfg.data.dev_fraction,
        "test_fraction": cfg.data.test_fraction,
        "sources": sources,
        "images": str(plan.images or ""),
    }


def _is_fresh(csv_path: Path, meta_path: Path, settings: dict) -> bool:
    """True when both outputs exist, were made with these settings and found the images (if
    they did not, the images may have been extracted since: look again)."""
    if not (csv_path.is_file() and meta_path.is_file()):
        return False
    try:
        recorded = read_json(meta_path)
    except CaptionerError:
        return False  # unreadable: make it again
    return (
        isinstance(recorded, dict)
        and bool(recorded.get("images_found"))
        and all(recorded.get(key) == value for key, value in settings.items())
    )


# --- cleaning and splitting ----------------------------------------------------------------------
def _clean_rows(source: formats.CaptionSource) -> tuple[pd.DataFrame, dict]:
    """Normalised captions of real image entries; what was dropped, with examples."""
    rows, strays, empty, seen = [], Counter(), 0, set()
    for image, raw in source.records:
        if not formats.is_image_name(image):  # e.g. Flickr8k's stray "...jpg.1" entry
            strays[image] += 1
            continue
        caption = normalize(raw)
        if not caption:
            empty += 1
            continue
        if (image, raw.strip()) in seen:  # the same caption twice would count twice in scores
            continue
        seen.add((image, raw.strip()))
        rows.append((image, caption, raw.strip()))
    dropped = {
        "malformed": {
            "unit": source.unit,
            "count": len(source.malformed),
            "first": source.malformed[:SHOWN],
        },
        "not_image_entries": {"names": sorted(strays), "captions": sum(strays.values())},
        "empty_captions": empty,
        "duplicate_captions": len(source.records) - sum(strays.values()) - empty - len(rows),
    }
    return pd.DataFrame(rows, columns=["image", "caption", "raw"]), dropped


def _split_map(
    cfg: Config, plan: Plan, source: formats.CaptionSource, images: pd.Series
) -> tuple[dict[str, str], str]:
    """{image: split} and which split that is: official, karpathy or random."""
    data = cfg.data
    if data.split == "karpathy":
        if plan.split_files:
            return formats.read_karpathy_json(plan.split_files[0]).splits, "karpathy"
        return source.splits, "karpathy"
    if data.split == "official":
        official = (
            formats.read_official_splits(plan.captions.parent)
            if plan.split_files
            else source.splits
        )
        if official:
            return official, "official"
        log(
            f"{plan.captions.name}: no official split in this format; using a random split "
            f"over images (seed {cfg.seed})"
        )
    return random_split(set(images), cfg.seed, data.dev_fraction, data.test_fraction), "random"


def _locate_images(cfg: Config, plan: Plan, images: set[str]) -> tuple[str, int, int]:
    """(images_dir as recorded, images found on disk, images missing on disk).

    Missing images are only counted: the features stage skips them and reports them.
    """
    if plan.images is not None:
        folder, recorded = plan.images, str(plan.images)
    else:
        # the folder under raw/ holding the most referenced images (Flickr8k: the misspelled
        # Flicker8k_Dataset; Flickr30k: wherever the zip put them)
        folder, best = cfg.raw_dir, 0
        for candidate, files in formats.walk(cfg.raw_dir):
            count = len(images.intersection(files))
            if count > best:
                folder, best = candidate, count
        recorded = Path(os.path.relpath(folder, cfg.dataset_dir)).as_posix()
    found = sum((folder / name).is_file() for name in images)
    return recorded, found, len(images) - found
