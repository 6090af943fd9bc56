"""The feature cache on disk (data/README.md): open a finished one, write one from parts.

  features.npy    one row per readable image, np.load(mmap_mode="r"), float32|float16:
                  (N, D) for layout "pooled" (one vector per image), (N, H, W, C) for layout
                  "grid" (a C-vector per region of an H x W grid: a CNN's last convolutional map)
  ids.txt         the image file name of each row
  bad_images.txt  "<image>\t<reason>" for every image that is missing or unreadable
  meta.json       encoder, weights, dim (D or C), count, layout, grid [H, W], ...; written
                  last: its presence = finished cache. No "layout" = pooled (older caches).
  checked.json    written by load_cache once every row was found finite (no NaN or infinity)

features.py builds caches (in resumable chunks, or as shards it merges); train, evaluate and
caption only read them, through load_cache. Every consumer gets rows in the shape its decoder
takes through one function, for_decoder: a grid serves a pooled decoder as its mean over regions.
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
LAYOUTS = ("pooled", "grid")  # what a cache holds, and what a decoder takes (its FEATURES)


@dataclass(frozen=True)
class FeatureCache:
    """A finished cache: features (N, D) or (N, H, W, C) memory-mapped, ids[i] = image of row i."""

    path: Path
    features: np.ndarray
    ids: list[str]
    meta: dict[str, Any]
    row: dict[str, int]

    @property
    def layout(self) -> str:
        return layout_of(self.meta)[0]

    @property
    def grid(self) -> tuple[int, int] | None:
        """(H, W) of a grid cache, None for a pooled one."""
        return layout_of(self.meta)[1]

    def describe(self) -> str:
        """The feature shape, for logs: 4096-d, or 14x14 grid of 512-d."""
        dim = self.meta["dim"]
        return f"{dim}-d" if self.grid is None else f"{self.grid[0]}x{self.grid[1]} grid of {dim}-d"

    def check_takes(self, takes: str, decoder: str) -> None:
        """One line if `decoder`, taking `takes` features, cannot use this cache."""
        for_decoder(self.features[:0], takes, decoder, where=self.path)

    def rows(self, indices, takes: str, decoder: str) -> np.ndarray:
        """The rows `indices` (a sequence of row numbers) as decoder `decoder` takes them."""
        self.check_takes(takes, decoder)
        return for_decoder(self.features[np.asarray(indices, np.int64)], takes, decoder)


def layout_of(meta: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """(layout, (H, W) or None) a cache's or a run's feature meta says; no "layout" = pooled."""
    layout = meta.get("layout", "pooled")
    grid = meta.get("grid")
    if layout == "grid" and isinstance(grid, list) and len(grid) == 2:
        return layout, (int(grid[0]), int(grid[1]))
    return layout, None


def for_decoder(
    rows: np.ndarray, takes: str, decoder: str, where: Path | str | None = None
) -> np.ndarray:
    """Feature rows, as read from a cache or made by an encoder, in the shape a decoder takes.

    rows (n, D) pooled or (n, H, W, C) grid, any float dtype -> float32:
      takes "pooled": (n, D) as they are, or (n, C) = the mean over the H*W regions of a grid
                      (the global average pooling of a CNN's map: one extraction serves both);
      takes "grid":   (n, H, W, C) as they are; pooled rows cannot be: one-line CaptionerError.
    `decoder` (its model.decoder name) and `where` (the cache) only name things in the error.
    """
    if takes not in LAYOUTS:
        raise CaptionerError(f"decoder {decoder} takes unknown features {takes!r}")
    if rows.ndim not in (2, 4):
        raise CaptionerError(
            f"{where or 'features'}: rows of shape {rows.shape[1:]}, not (D,) or (H, W, C)"
        )
    if rows.ndim == 4 and takes == "pooled":
        return rows.mean(axis=(1, 2), dtype=np.float32)  # (n, C), accumulated in float32
    if rows.ndim == 2 and takes == "grid":
        prefix = f"{where}: pooled features; " if where is not None else ""
        raise CaptionerError(
            f"{prefix}decoder {decoder} needs a grid cache: run `captioner features --grid`"
        )
    return np.asarray(rows, dtype=np.float32)


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
    expected = (len(ids), *row_shape(meta, folder / "meta.json", rerun))
    if features.shape != expected or meta["count"] != len(ids):
        says = " x ".join(str(n) for n in (meta["count"], *expected[1:]))
        raise CaptionerError(
            f"{folder}: features.npy is {features.shape}, ids.txt has {len(ids)} "
            f"lines, meta.json says {says}; {rerun}"
        )
    row = {name: index for index, name in enumerate(ids)}
    if len(row) != len(ids):
        raise CaptionerError(f"{folder / 'ids.txt'}: an image is listed twice; {rerun}")
    _check_finite(folder, features, ids, rerun)
    return FeatureCache(folder, features, ids, meta, row)


def row_shape(meta: dict[str, Any], where: Path | str = "meta.json", fix: str = "") -> tuple:
    """The shape of one row meta.json describes: (dim,) pooled, (H, W, dim) grid."""
    layout, grid = layout_of(meta)
    if layout not in LAYOUTS or (layout == "grid" and grid is None):
        raise CaptionerError(
            f"{where}: layout {layout!r} with grid {meta.get('grid')!r}; expected layout "
            f'"pooled", or "grid" with grid [H, W]{"; " + fix if fix else ""}'
        )
    return (meta["dim"],) if grid is None else (*grid, meta["dim"])


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
    step = max(1, CHECK_BYTES // max(1, features[:1].nbytes))
    bad, first = 0, -1
    for start in range(0, len(features), step):
        block = features[start : start + step].reshape(-1, features[:1].size)  # (n, values)
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
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
    shape = row_shape(meta)
    array = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.dtype(meta["dtype"]), shape=(len(ids), *shape)
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
        f"{out}: {len(ids)} features of shape {'x'.join(map(str, shape))}, {len(bad) - missing} "
        f"unreadable and {missing} missing images"
    )


def read_bad(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / "bad_images.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if line]  # type: ignore[misc]
