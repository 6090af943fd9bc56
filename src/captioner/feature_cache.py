"""The feature cache on disk (data/README.md): open a finished one, write one from parts.

  features.npy    (N, D) float32|float16, one row per readable image, np.load(mmap_mode="r")
  ids.txt         the image file name of each row
  bad_images.txt  "<image>\t<reason>" for every image that is missing or unreadable
  meta.json       encoder, weights, dim, count, ...; written last: its presence = finished cache
  checked.json    written by load_cache once every row was found finite (no NaN or infinity)

features.py builds caches (in resumable chunks, or as shards it merges); train, evaluate and
caption only read them, through load_cache.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.io import atomic_write_bytes, log, read_json, write_json

FORMAT = 1
REQUIRED_META = ("encoder", "dim", "count")
CHECK_BYTES = 64 << 20  # the finite check reads this much at a time: memory stays flat


@dataclass(frozen=True)
class FeatureCache:
    """A finished cache: features (N, D) memory-mapped, ids[i] = image of row i."""

    path: Path
    features: np.ndarray
    ids: list[str]
    meta: dict[str, Any]
    row: dict[str, int]


def is_finished(features_dir: str | Path) -> bool:
    """meta.json is written last: its presence means a complete cache (load_cache checks it)."""
    return (Path(features_dir) / "meta.json").is_file()


def load_cache(features_dir: str | Path) -> FeatureCache:
    """Open a finished cache; one-line CaptionerError if it is missing, unfinished or corrupt."""
    folder = Path(features_dir)
    rerun = f"run `captioner features` (delete {folder} first if it is corrupt)"
    if not is_finished(folder):
        state = "unfinished" if (folder / "chunks").is_dir() else "no"
        raise CaptionerError(f"{folder}: {state} feature cache (no meta.json); {rerun}")
    meta = read_json(folder / "meta.json")
    missing = [key for key in REQUIRED_META if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CaptionerError(f"{folder / 'meta.json'}: missing {', '.join(missing)}; {rerun}")
    try:
        features = np.load(folder / "features.npy", mmap_mode="r", allow_pickle=False)
        ids = (folder / "ids.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as error:
        raise CaptionerError(f"{folder}: unreadable cache ({error}); {rerun}") from None
    if features.ndim != 2 or features.shape != (len(ids), meta["dim"]) or meta["count"] != len(ids):
        raise CaptionerError(
            f"{folder}: features.npy is {features.shape}, ids.txt has {len(ids)} "
            f"lines, meta.json says {meta['count']} x {meta['dim']}; {rerun}"
        )
    row = {name: index for index, name in enumerate(ids)}
    if len(row) != len(ids):
        raise CaptionerError(f"{folder / 'ids.txt'}: an image is listed twice; {rerun}")
    _check_finite(folder, features, ids, rerun)
    return FeatureCache(folder, features, ids, meta, row)


def _check_finite(folder: Path, features: np.ndarray, ids: list[str], rerun: str) -> None:
    """Refuse rows holding NaN or infinity (they make every loss NaN), reading the memmap in
    blocks. checked.json records features.npy's size, mtime and inode once it passed, so an
    unchanged cache is read once, and any rewrite or edit of features.npy is checked again."""
    info = (folder / "features.npy").stat()
    stamp = {
        "finite": True,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "inode": info.st_ino,
    }
    try:
        if read_json(folder / "checked.json") == stamp:
            return
    except CaptionerError:
        pass  # not checked yet, or an unreadable record: check again
    step = max(1, CHECK_BYTES // max(1, features.shape[1] * features.itemsize))
    bad, first = 0, -1
    for start in range(0, len(features), step):
        rows = np.flatnonzero(~np.isfinite(features[start : start + step]).all(axis=1))
        if len(rows) and first < 0:
            first = start + int(rows[0])
        bad += len(rows)
    if bad:
        raise CaptionerError(
            f"{folder / 'features.npy'}: {bad} row(s) hold NaN or infinity (the first is row "
            f"{first}, {ids[first]}); {rerun}"
        )
    try:
        write_json(folder / "checked.json", stamp)
    except OSError:
        pass  # a read-only cache is simply checked again next time


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save via a temporary file, fsync'd and renamed: a kill leaves the old state or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def assemble(out: Path, chunks_dir: Path, n_chunks: int, meta: dict[str, Any]) -> None:
    """Concatenate the chunks into the finished cache, then remove them."""
    parts = []
    for k in range(n_chunks):
        record = read_json(chunks_dir / f"{k:05d}.json")
        rows = np.load(chunks_dir / f"{k:05d}.npy", mmap_mode="r", allow_pickle=False)
        parts.append((rows, record["ids"], [tuple(pair) for pair in record["bad"]]))
    write_cache(out, parts, meta)
    shutil.rmtree(chunks_dir)


def write_cache(
    out: Path,
    parts: list[tuple[np.ndarray, list[str], list[tuple[str, str]]]],
    meta: dict[str, Any],
) -> None:
    """features.npy, ids.txt, bad_images.txt from (rows, ids, bad) parts; meta.json last."""
    ids = [name for _, names, _ in parts for name in names]
    bad = [pair for _, _, pairs in parts for pair in pairs]
    tmp = out / "features.npy.tmp"
    array = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.dtype(meta["dtype"]), shape=(len(ids), meta["dim"])
    )
    start = 0
    for rows, _, _ in parts:
        array[start : start + len(rows)] = rows
        start += len(rows)
    array.flush()
    del array
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out / "features.npy")
    atomic_write_bytes(out / "ids.txt", "".join(f"{name}\n" for name in ids).encode())
    lines = "".join(f"{name}\t{' '.join(reason.split())}\n" for name, reason in bad)
    atomic_write_bytes(out / "bad_images.txt", lines.encode())
    missing = sum(reason.startswith("missing") for _, reason in bad)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(
        out / "meta.json",
        {
            **meta,
            "count": len(ids),
            "bad": len(bad) - missing,
            "missing": missing,
            "created": created,
        },
    )
    log(
        f"{out}: {len(ids)} features of dimension {meta['dim']}, {len(bad) - missing} unreadable "
        f"and {missing} missing images"
    )


def read_bad(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / "bad_images.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if line]  # type: ignore[misc]
