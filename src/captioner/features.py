"""`captioner features`: run an image encoder once over every image and cache what it gives.

The cache goes to cfg.features_dir, DIR/<dataset>/features/<encoder>/ for pooled vectors and
features/<encoder>-grid/ for grids (features.layout; Config.features_dir names every variant):
features.npy, ids.txt, bad_images.txt, meta.json last; feature_cache.py reads and writes that
format, data/README.md describes it.

Work in progress lives in chunks/: one .npy + .json pair per cfg.features.chunk_size images, the
.json written (atomically) after its .npy, so a killed run redoes at most one chunk. A batch never
spans two chunks, so a resumed run gives the same array as an uninterrupted one. A sharded run
(`--shard I/N`, I = 0..N-1 like a worker index) builds the same cache for the I-th contiguous
block of chunks in shards/I-of-N/; `--merge` concatenates the N finished shards into one cache.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from captioner.captions import load_captions
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.feature_cache import (
    FORMAT,
    assemble,
    is_finished,
    load_cache,
    read_bad,
    save_npy,
    write_cache,
)
from captioner.io import library_versions, log, names_sha256, read_json, write_json
from captioner.limits import parse_shard

# Keys that must agree between a finished cache (or unfinished chunks, or shards) and the config.
SETTINGS = (
    "encoder",
    "weights",
    "seed",
    "precision",
    "dtype",
    "images_sha256",
    "layout",
    "grid_size",
    "image_size",
)
SHAPE = ("dim", "layout", "input_size", "grid")  # what one image gives (Encoder.describe)


# --- settings and image list ----------------------------------------------------------------------
def _image_list(cfg: Config) -> tuple[list[str], Path]:
    """Unique image names from captions.csv in file order, and the folder holding them."""
    frame, images_dir = load_captions(cfg)
    return list(dict.fromkeys(frame["image"])), images_dir


def _settings(cfg: Config, names: list[str]) -> dict[str, Any]:
    """What decides the numbers in a cache (precision and dtype may still be "auto" = any)."""
    weights, layout = cfg.features.weights, cfg.features_layout
    if weights not in ("imagenet", "none"):
        weights = str(Path(weights).expanduser().resolve())
    return {
        "encoder": cfg.features.encoder,
        "weights": weights,
        "seed": cfg.seed if weights == "none" else None,
        "precision": cfg.features.precision,
        "dtype": cfg.features.dtype,
        "images_sha256": names_sha256(names),
        "layout": layout,
        "grid_size": cfg.features.grid_size if layout == "grid" else 0,
        "image_size": cfg.features.image_size,
    }


def _check_same(found: dict[str, Any], wanted: dict[str, Any], where: Path, fix: str) -> None:
    """Keys present in both must agree; "auto" (precision, dtype) in `wanted` accepts any."""
    for key in SETTINGS:
        if key not in found or key not in wanted or wanted[key] == "auto":
            continue
        if found[key] != wanted[key]:
            what = (
                "the image list (captions.csv changed)"
                if key == "images_sha256"
                else (f"{key}={found[key]!r}, not {wanted[key]!r}")
            )
            raise CaptionerError(f"{where}: made with {what}; {fix}")


# --- extraction -----------------------------------------------------------------------------------
def extract(cfg: Config) -> Path:
    """Compute (or resume, or reuse) the feature cache for cfg; return its folder.

    With cfg.features.shard = "I/N", only shard I's block of chunks, into shards/I-of-N/.
    A finished cache made with other settings is an error (never silently recomputed)."""
    names, images_dir = _image_list(cfg)
    out, chunk_size = cfg.features_dir, cfg.features.chunk_size
    wanted = _settings(cfg, names)
    extra: dict[str, Any] = {}
    if cfg.features.shard:
        index, count = parse_shard(cfg.features.shard)
        chunks = np.array_split(np.arange(-(-len(names) // chunk_size)), count)[index]
        start, stop = (
            (chunks[0] * chunk_size, (chunks[-1] + 1) * chunk_size) if len(chunks) else (0, 0)
        )
        out = out / "shards" / f"{index}-of-{count}"
        extra = {"shard": f"{index}/{count}", "shard_first": int(start), "images": len(names)}
        names = names[start:stop]
    if is_finished(out):
        _check_same(
            load_cache(out).meta,
            wanted,
            out,
            f"delete {out} to recompute, or pass the settings it was made with",
        )
        if (out / "chunks").is_dir():  # killed after meta.json, before the clean-up
            shutil.rmtree(out / "chunks")
        log(f"reusing {out}")
        return out
    _compute(cfg, names, images_dir, out, wanted, extra)
    return out


def _compute(
    cfg: Config,
    names: list[str],
    images_dir: Path,
    out: Path,
    settings: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    from captioner import encoders

    if cfg.features.encoder not in encoders.ENCODERS:
        raise CaptionerError(
            f"{out}: no finished feature cache, and '{cfg.features.encoder}' is no encoder to "
            f"compute one (features.encoder: {', '.join(encoders.ENCODERS)}, or the name of a "
            "cache folder of your own)"
        )
    settings = {**settings, "precision": encoders.resolve_precision(settings["precision"])}
    chunks_dir, size = out / "chunks", cfg.features.chunk_size
    plan_path = chunks_dir / "plan.json"
    # A plan binds only once a chunk is done: a start that failed before (a bad --weights file,
    # say) leaves nothing that blocks other settings.
    resuming = plan_path.is_file() and any(chunks_dir.glob("[0-9]*.json"))
    plan: dict[str, Any] = {}
    if resuming:
        plan = read_json(plan_path)
        _check_same(
            plan,
            settings,
            chunks_dir,
            f"finish them with those settings or delete {chunks_dir} to start over",
        )
        size = plan["chunk_size"]  # resume on the same boundaries
    elif (out / "features.npy").is_file():
        log(f"{out}: features.npy without meta.json (unfinished or damaged); computing it again")
    if settings["dtype"] == "auto":  # a plan's, or float16 for grids: Flickr30k's VGG16
        # 14x14x512 grids are 6.4 GB in float16 (_stored refuses values float16 cannot hold)
        grid = settings["layout"] == "grid"
        settings["dtype"] = plan.get("dtype", "float16" if grid else "float32")
    chunk_names = [names[start : start + size] for start in range(0, len(names), size)]
    todo = [k for k in range(len(chunk_names)) if not (chunks_dir / f"{k:05d}.json").is_file()]
    present = {name for k in todo for name in chunk_names[k] if (images_dir / name).is_file()}
    missing = sum(len(chunk_names[k]) for k in todo) - len(present)
    if todo and not present and missing == len(names):
        raise CaptionerError(
            f"{images_dir}: none of the {len(names)} images listed in "
            f"{cfg.captions_csv} exist; check images_dir in captions.json"
        )
    if missing:
        log(
            f"{images_dir}: {missing} images listed in {cfg.captions_csv} are missing "
            f"(listed in bad_images.txt)"
        )
    if len(todo) < len(chunk_names):
        log(f"resuming {out}: {len(chunk_names) - len(todo)} of {len(chunk_names)} chunks done")
    shape = {key: plan[key] for key in SHAPE if key in plan}  # what one image gives
    if todo or "dim" not in shape:
        # the encoder before the plan: if it cannot be built, nothing is written
        encoder = encoders.build_encoder(
            cfg.features.encoder,
            cfg.features.weights,
            settings["precision"],
            cfg.seed,
            layout=settings["layout"],
            grid_size=settings["grid_size"],
            image_size=settings["image_size"],
        )
        shape = encoder.describe()
        if not resuming:
            write_json(plan_path, {**settings, "chunk_size": size, **shape})
    if todo:
        groups = [chunk_names[k] for k in todo]
        dtype = np.dtype(settings["dtype"])
        _run_chunks(cfg, encoder, chunks_dir, images_dir, groups, todo, present, dtype)
    assemble(
        out,
        chunks_dir,
        len(chunk_names),
        {
            "format": FORMAT,
            **settings,
            **shape,
            "chunk_size": size,
            "preprocessing": "keras.utils.load_img(target_size) equivalent + preprocess_input",
            "images_dir": str(images_dir.resolve()),
            **extra,
            "versions": library_versions(),
        },
    )


def _run_chunks(
    cfg: Config,
    encoder: Any,
    chunks_dir: Path,
    images_dir: Path,
    chunk_names: list[list[str]],
    chunk_ids: list[int],
    present: set[str],
    dtype: np.dtype,
) -> None:
    """Encode the present images of each chunk; write each chunk as soon as it is complete."""
    name_of = {str(images_dir / n): n for chunk in chunk_names for n in chunk if n in present}
    groups = [[str(images_dir / n) for n in chunk if n in present] for chunk in chunk_names]
    pending = {
        k: {
            "rows": [],
            "ids": [],
            "bad": [[n, "missing: no such file"] for n in chunk if n not in present],
        }
        for k, chunk in enumerate(chunk_names)
    }

    def finish(k: int) -> None:
        part = pending.pop(k)
        rows = np.concatenate(part["rows"] or [np.zeros((0, *encoder.row_shape), np.float32)])
        save_npy(chunks_dir / f"{chunk_ids[k]:05d}.npy", _stored(rows, dtype, chunks_dir.parent))
        write_json(
            chunks_dir / f"{chunk_ids[k]:05d}.json", {"ids": part["ids"], "bad": part["bad"]}
        )

    for k, group in enumerate(groups):
        if not group:  # every image of the chunk is missing: nothing to encode
            finish(k)
    remaining = {k: len(group) for k, group in enumerate(groups)}
    with tqdm(
        total=sum(remaining.values()),
        unit="img",
        desc=f"features {encoder.name}",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        for k, rows, ok, failed in encoder.encode_groups(groups, cfg.features.batch_size):
            part = pending[k]
            part["rows"].append(rows)
            part["ids"] += [name_of[path] for path in ok]
            for path, reason in failed:
                log(f"{path}: {reason}; skipped (listed in bad_images.txt)")
                part["bad"].append([name_of[path], reason])
            remaining[k] -= len(ok) + len(failed)
            progress.update(len(ok) + len(failed))
            if remaining[k] == 0:
                finish(k)


def _stored(rows: np.ndarray, dtype: np.dtype, where: Path) -> np.ndarray:
    """rows as stored on disk; one line if `dtype` (float16) cannot hold them: values beyond
    its range (65504) would become infinite, and tiny ones (below ~6e-8: random-weight
    MobileNet's features are ~1e-9) zero, silently."""
    stored = rows.astype(dtype)
    overflow = int((np.isfinite(rows) & ~np.isfinite(stored)).sum())
    flushed = int(((rows != 0) & (stored == 0)).sum())
    if overflow or flushed > 0.01 * rows.size:
        raise CaptionerError(
            f"{where}: features.dtype {dtype} cannot hold these features ({overflow} values "
            f"overflow, {flushed} of {rows.size} become 0); set features.dtype=float32"
        )
    return stored


def merge_shards(cfg: Config) -> Path:
    """Concatenate the finished shards/I-of-N/ caches, in order, into cfg.features_dir."""
    out = cfg.features_dir
    if is_finished(out):
        log(f"reusing {out}")
        return out
    found = [re.fullmatch(r"(\d+)-of-(\d+)", p.name) for p in (out / "shards").glob("*-of-*")]
    counts = {int(match[2]) for match in found if match}
    if len(counts) != 1:
        raise CaptionerError(
            f"{out / 'shards'}: expected shards I-of-N for one N, found "
            f"{sorted(counts) or 'none'}; run `captioner features --shard I/N`"
        )
    count = counts.pop()
    names, _ = _image_list(cfg)
    caches = []
    for index in range(count):
        folder = out / "shards" / f"{index}-of-{count}"
        if not is_finished(folder):
            raise CaptionerError(
                f"{folder}: shard {index}/{count} is not finished; run "
                f"`captioner features --shard {index}/{count}`"
            )
        caches.append(load_cache(folder))
    first = caches[0].meta
    for cache in caches:
        _check_same(
            cache.meta,
            first,
            cache.path,
            f"recompute it with the settings of {caches[0].path.name}",
        )
    _check_same(
        first,
        _settings(cfg, names),
        out / "shards",
        "recompute the shards with the current settings and captions.csv",
    )
    parts = [(cache.features, cache.ids, read_bad(cache.path)) for cache in caches]
    covered = [name for _, ids, bad in parts for name in ids + [pair[0] for pair in bad]]
    if sorted(covered) != sorted(names):
        raise CaptionerError(
            f"{out / 'shards'}: the shards do not cover the {len(names)} images "
            "exactly (made with different chunk sizes?); recompute them"
        )
    meta = {key: value for key, value in first.items() if not key.startswith("shard")}
    meta.pop("images", None)
    write_cache(out, parts, {**meta, "merged_shards": count})
    log(f"merged {count} shards; {out / 'shards'} can now be deleted")
    return out
