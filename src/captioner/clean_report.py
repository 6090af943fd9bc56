"""What `captioner clean` reports: the counts captions.json records, the summary it logs, and
why nothing was left when no caption survived cleaning."""

from __future__ import annotations

import numpy as np
import pandas as pd

from captioner import formats
from captioner.config import Config
from captioner.io import log

SPLITS = ("train", "dev", "test")
SHOWN = 5  # how many line numbers or names a report lists before "..."


def why_none(dropped: dict) -> str:
    """Why no caption survived cleaning, from what `_clean_rows` dropped."""
    reasons = []
    if dropped["empty_captions"]:
        reasons.append(
            f"{dropped['empty_captions']} captions are empty after cleaning, which keeps only "
            "letters and spaces (punctuation, digits and other scripts are removed)"
        )
    strays = dropped["not_image_entries"]
    if strays["names"]:
        reasons.append(
            f"{strays['captions']} captions name no image file (e.g. '{strays['names'][0]}')"
        )
    return "; ".join(reasons) or "nothing to keep"


def statistics(frame: pd.DataFrame) -> dict:
    """Images and captions per split, training vocabulary size and caption lengths."""
    per_split = {
        split: {
            "images": int(frame.loc[frame["split"] == split, "image"].nunique()),
            "captions": int((frame["split"] == split).sum()),
        }
        for split in SPLITS
    }
    train = frame.loc[frame["split"] == "train", "caption"].str.split()
    lengths = train.str.len().to_numpy() if len(train) else np.zeros(1)
    return {
        "splits": per_split,
        "vocabulary_train": len({word for words in train for word in words}),
        "caption_length_train": {
            "mean": round(float(lengths.mean()), 2),
            "max": int(lengths.max()),
            "p95": float(np.percentile(lengths, 95)),
        },
    }


def log_summary(
    cfg: Config,
    source: formats.CaptionSource,
    split_used: str,
    counts: dict,
    dropped: dict,
    images_dir: str,
    missing: int,
) -> None:
    log(
        f"{cfg.data.dataset}: read {counts['images']:,} images, {counts['captions']:,} captions "
        f"from {source.path} (format {source.format})"
    )
    malformed = dropped["malformed"]
    if malformed["count"]:
        more = ", ..." if malformed["count"] > SHOWN else ""
        log(
            f"skipped {malformed['count']} malformed {malformed['unit']}s of {source.path.name} "
            f"({malformed['unit']}s {', '.join(map(str, malformed['first']))}{more})"
        )
    strays = dropped["not_image_entries"]
    if strays["names"]:
        log(
            f"dropped {strays['captions']} captions whose image name is not a real image entry "
            f"({len(strays['names'])}): {', '.join(strays['names'][:SHOWN])}"
        )
    if dropped["empty_captions"]:
        log(f"dropped {dropped['empty_captions']} captions that are empty after cleaning")
    if dropped["duplicate_captions"]:
        log(f"dropped {dropped['duplicate_captions']} exact repeats of an image's caption")
    if dropped["no_split"]["images"]:
        log(
            f"dropped {dropped['no_split']['images']:,} images "
            f"({dropped['no_split']['captions']:,} captions) that are in no {split_used} split; "
            f"the {split_used} split covers {counts['images'] - dropped['no_split']['images']:,} "
            f"of {counts['images']:,} images (--split random keeps them all)"
        )
    sizes = "; ".join(
        f"{split} {counts['splits'][split]['images']:,} images / "
        f"{counts['splits'][split]['captions']:,} captions"
        for split in SPLITS
    )
    log(f"split {split_used}: {sizes}")
    length = counts["caption_length_train"]
    log(
        f"vocabulary (train): {counts['vocabulary_train']:,} words; caption length (train, words): "
        f"mean {length['mean']:.1f}, max {length['max']}, 95th percentile {length['p95']:.0f}"
    )
    total = sum(counts["splits"][split]["images"] for split in SPLITS)
    note = f" ({missing:,} of {total:,} not found there; features skips them)" if missing else ""
    log(f"images: {images_dir}{note}")
