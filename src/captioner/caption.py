"""`captioner caption`: captions for new images, from one or several trained runs.

A run directory is self-describing (docs/CONTRACTS.md): config.json gives the decoding settings,
vocab.json the words, model.keras the weights and features_meta.json the encoder its features
came from. `loaded_run.load_run` loads all of that once (re-exported here, as before);
`LoadedRun.caption_files` is also the API the web app uses. Runs made with the same encoder share
one encoder instance.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.attention_maps import Attended, attend_features, png_names
from captioner.formats import IMAGE_SUFFIXES, is_image_name
from captioner.io import log
from captioner.loaded_run import DecodeSettings, LoadedRun, load_run
from captioner.runs import latest_run

__all__ = ["LoadedRun", "caption_command", "expand_images", "latest_run", "load_run", "tsv_field"]

TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
STREAM_CHUNK = 64  # images captioned (and printed) at a time by `captioner caption`


def expand_images(images: Iterable[str | Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths, [(folder, reason)]): files as given (bad ones are reported when read),
    folders -> their image files by suffix, sorted; a folder without any is a failure."""
    paths: list[str] = []
    failures = []
    for item in images:
        path = Path(item)
        if not path.is_dir():
            paths.append(str(path))
            continue
        found = sorted(
            str(p) for p in path.iterdir() if is_image_name(p.name) and not p.name.startswith(".")
        )
        if not found:
            failures.append((str(path), f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
        paths += found
    return list(dict.fromkeys(paths)), failures


def caption_command(
    images: Sequence[str],
    runs: Sequence[str],
    runs_dir: str | Path = "runs",
    beam: int | None = None,
    as_json: bool = False,
    attention_dir: str | Path | None = None,
) -> int:
    """Print image<TAB>model<TAB>caption (or JSON lines) per image and model, chunk by chunk as
    they are made, with a progress bar on stderr; return the number of images (or folders without
    images) that failed, each also named on stderr. With `attention_dir`, also write each
    attention run's figure of every image there (AttentionFigures)."""
    from tqdm import tqdm

    if attention_dir is not None:
        from captioner import attention_plots  # noqa: F401  (matplotlib: checked before any work)
    if not runs:
        runs = [str(latest_run(runs_dir))]
        log(f"using the latest finished run {runs[0]} (choose with --model)")
    paths, empty_folders = expand_images(images)
    for folder, reason in empty_folders:
        log(f"{folder}: {reason}")
    loaded = [load_run(run) for run in dict.fromkeys(runs)]  # one encoder per kind, shared
    decoding = [run.decode_settings(beam) for run in loaded]  # each run's config plus --beam
    figures = AttentionFigures(loaded, paths, attention_dir) if attention_dir else None
    failed = 0
    with tqdm(
        total=len(paths), unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True
    ) as progress:
        for start in range(0, len(paths), STREAM_CHUNK):
            chunk = paths[start : start + STREAM_CHUNK]
            results = _caption_chunk(loaded, decoding, chunk, with_maps=figures is not None)
            failed += _print_chunk(chunk, results, loaded, as_json)
            if figures is not None:
                figures.write(results[0])
            progress.update(len(chunk))
    if figures is not None:
        figures.report()
    return failed + len(empty_folders)


def _caption_chunk(
    loaded: Sequence[LoadedRun],
    decoding: Sequence[DecodeSettings],
    chunk: Sequence[str],
    with_maps: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """([{path: caption}] per run, or [{path: Attended}] `with_maps`, and {path: reason} of
    unreadable images); each image is encoded once per distinct encoder, however many runs
    share it."""
    encoded: dict[int, tuple[np.ndarray, list[str]]] = {}
    failed: dict[str, str] = {}
    captions = []
    for run, settings in zip(loaded, decoding, strict=True):
        if id(run.encoder) not in encoded:
            features, ok, failures = run.encode_files(chunk)
            encoded[id(run.encoder)] = (features, ok)
            for path, reason in failures:
                failed.setdefault(path, reason)
        features, ok = encoded[id(run.encoder)]
        if with_maps:
            made = attend_features(run, features, settings)
        else:
            made = run.caption_features(features, settings)
        captions.append(dict(zip(ok, made, strict=True)))
    return captions, failed


def _print_chunk(
    chunk: Sequence[str],
    results: tuple[list[dict[str, Any]], dict[str, str]],
    loaded: Sequence[LoadedRun],
    as_json: bool,
) -> int:
    """Write one chunk's captions to stdout (flushed: a pipe sees them now); return failures."""
    captions, failed = results
    for path in chunk:
        if path in failed:
            log(f"{tsv_field(path)}: {failed[path]}")
            continue
        for run, by_path in zip(loaded, captions, strict=True):
            caption = by_path[path]
            if isinstance(caption, Attended):
                caption = caption.caption
            if as_json:
                print(json.dumps({"image": path, "model": run.name, "caption": caption}))
            else:
                print("\t".join(tsv_field(text) for text in (path, run.name, caption)))
    sys.stdout.flush()
    return len(failed)


def tsv_field(text: str) -> str:
    r"""`text` as one TSV field on one line: a backslash, tab, newline or carriage return is
    written \\, \t, \n or \r (README), so any file name keeps its row and its columns."""
    return text.translate(TSV_ESCAPES)


class AttentionFigures:
    """Writes the `--attention DIR` figures: per image, DIR/<image stem>.png of the one attention
    run, or DIR/<run name>/<image stem>.png of each with several. A run without attention (merge)
    is named once, on stderr, and left out."""

    def __init__(self, loaded: Sequence[LoadedRun], paths: Sequence[str], folder: str | Path):
        from captioner.models import decoder_for

        self.folder, self.names, self.written = Path(folder), png_names(paths), 0
        self.runs = {}  # index in `loaded` -> the folder of its figures
        attending = [i for i, run in enumerate(loaded) if decoder_for(run.model).regions]
        for index, run in enumerate(loaded):
            if index not in attending:
                log(
                    f"{run.run_dir}: no attention maps to draw: a {run.cfg.model.decoder} run "
                    "sees one vector per image (--attention draws attention runs)"
                )
            elif len(attending) == 1:
                self.runs[index] = self.folder
            else:
                self.runs[index] = self.folder / run.name
        self.loaded = loaded

    def write(self, by_run: Sequence[dict[str, Attended]]) -> None:
        """One chunk's figures: {path: Attended} per run, as _caption_chunk gives them."""
        from captioner.attention_plots import write_attention_png

        for index, folder in self.runs.items():
            for path, attended in by_run[index].items():
                title = f"{Path(path).name} ({self.loaded[index].name})"
                write_attention_png(folder / self.names[path], Path(path), attended, title)
                self.written += 1

    def report(self) -> None:
        if self.runs:
            log(f"{self.written} attention figures in {self.folder}")
