"""Which data a run was trained on, and where its scores per split and decoding settings live.

`captioner train` pins the data in runs/<name>/data.json before the first epoch:

    {"format": 1, "captions_csv": "...", "captions_sha256": "...",
     "splits": {"train": {"images": N, "captions": M, "images_sha256": "..."}, "dev": ..., ...}}

(`images_sha256` is the sha256 of the split's sorted image names, one per line). `evaluate`
compares it with the dataset's captions.csv and refuses to score a run on captions or splits it
was not trained with: after a re-split, the "test" images may be ones the run trained on.

Each evaluation keeps its own files, named by split and decoding settings, e.g.
metrics-test-beam3.json and predictions-test-beam3.csv (plus -lp<alpha>, -norepeat<n>,
-max<length> when those are set). Runs evaluated before this layout hold one metrics.json and
predictions.csv; they are still read (`find_predictions`), never reused as a result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from captioner.captions import load_captions
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import file_sha256, log, names_sha256, read_json, write_json

DATA_JSON = "data.json"
FORMAT = 1
LEGACY_METRICS, LEGACY_PREDICTIONS = "metrics.json", "predictions.csv"


def describe(cfg: Config) -> dict[str, Any]:
    """The captions file of cfg's dataset: its sha256 and, per split, its images."""
    frame, _ = load_captions(cfg)
    splits = {}
    for split, rows in frame.groupby("split", sort=True):
        names = sorted(set(rows["image"]))
        splits[split] = {
            "images": len(names),
            "captions": len(rows),
            "images_sha256": names_sha256(names),
        }
    return {
        "format": FORMAT,
        "captions_csv": str(cfg.captions_csv.resolve()),
        "captions_sha256": file_sha256(cfg.captions_csv),
        "splits": splits,
    }


def pin(run_dir: Path, cfg: Config) -> Path:
    """Record the data a new run trains on (runs/<name>/data.json)."""
    return write_json(Path(run_dir) / DATA_JSON, describe(cfg))


def check(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The current data (`describe`) if it is what the run was trained on, else a one-line
    CaptionerError naming what changed. Runs trained before data.json existed get a warning."""
    now = describe(cfg)
    path = Path(run_dir) / DATA_JSON
    if not path.is_file():
        log(
            f"warning: {run_dir} has no {DATA_JSON} (trained before runs pinned their data), so "
            f"it cannot be checked that {cfg.captions_csv} holds the splits it was trained on"
        )
        return now
    pinned = read_json(path)
    if not isinstance(pinned, dict) or not isinstance(pinned.get("splits"), dict):
        raise CaptionerError(f"{path}: not a captioner data.json; copy the run again")
    if pinned.get("captions_sha256") == now["captions_sha256"]:
        return now
    splits = sorted(set(pinned["splits"]) | set(now["splits"]))
    moved = [
        split
        for split in splits
        if (pinned["splits"].get(split) or {}).get("images_sha256")
        != (now["splits"].get(split) or {}).get("images_sha256")
    ]
    what = (
        f"the {'/'.join(moved)} split holds other images"
        if moved
        else "the same images per split, other captions"
    )
    raise CaptionerError(
        f"{cfg.captions_csv}: not the captions run {run_dir} was trained on ({what}; see "
        f"{path}); scores would be wrong. Clean again with the run's settings (data.split="
        f"{cfg.data.split}, seed={cfg.seed}) or evaluate a run trained on this file"
    )


# --- result files -----------------------------------------------------------------------------
def result_tag(split: str, settings: dict[str, Any], default_max_length: int) -> str:
    """'test-beam3', 'dev-beam1-lp0.7-norepeat3-max20': a split and its decoding settings."""
    parts = [re.sub(r"[^A-Za-z0-9_]", "_", split), f"beam{settings['beam']}"]
    if settings["length_penalty"]:
        parts.append(f"lp{settings['length_penalty']:g}")
    if settings["no_repeat_ngram"]:
        parts.append(f"norepeat{settings['no_repeat_ngram']}")
    if settings["max_length"] != default_max_length:
        parts.append(f"max{settings['max_length']}")
    return "-".join(parts)


def result_paths(run_dir: Path, tag: str) -> tuple[Path, Path]:
    """(metrics json, predictions csv) of one evaluation."""
    return Path(run_dir) / f"metrics-{tag}.json", Path(run_dir) / f"predictions-{tag}.csv"


def find_predictions(run_dir: Path, split: str = "test") -> Path | None:
    """The newest finished evaluation's predictions for `split` (an old run's predictions.csv
    when its metrics.json names that split), or None."""
    run_dir = Path(run_dir)
    found = []
    for metrics_path in run_dir.glob(f"metrics-{split}-*.json"):
        predictions = run_dir / ("predictions-" + metrics_path.name[8:-5] + ".csv")
        if predictions.is_file():
            found.append((metrics_path.stat().st_mtime_ns, predictions))
    if found:
        return max(found)[1]
    legacy = run_dir / LEGACY_METRICS
    if (run_dir / LEGACY_PREDICTIONS).is_file() and legacy.is_file():
        try:
            if read_json(legacy).get("split") == split:
                return run_dir / LEGACY_PREDICTIONS
        except (CaptionerError, AttributeError):
            return None
    return None
