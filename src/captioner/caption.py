"""`captioner caption`: captions for new images, from one or several trained runs.

A run directory is self-describing (docs/CONTRACTS.md): config.json gives the decoding settings,
vocab.json the words, model.keras the weights and features_meta.json the encoder its features
came from. `load_run` loads all of that once; `LoadedRun.caption_files` is also the API the web
app uses. Runs made with the same encoder share one encoder instance.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.config import LIMITS, Config, from_dict
from captioner.errors import CaptionerError
from captioner.io import log, read_json
from captioner.tokenizer import Vocabulary

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RUN_FILES = ("config.json", "vocab.json", "features_meta.json", "model.keras")
TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
STREAM_CHUNK = 64  # images captioned (and printed) at a time by `captioner caption`


@dataclass
class LoadedRun:
    """A trained run, loaded once: model, vocabulary, decoding settings and (optionally) encoder."""

    run_dir: Path
    cfg: Config
    vocab: Vocabulary
    model: Any  # keras.Model
    features_meta: dict
    encoder: Any = None  # encoders.Encoder, built from features_meta; None if not needed

    @property
    def name(self) -> str:
        return self.run_dir.name

    def decode_settings(self, beam: int | None = None) -> dict[str, Any]:
        """Beam width (argument, else the run's config), length penalty, n-gram block, cap."""
        decode_cfg = self.cfg.decode
        beam = decode_cfg.beam if beam is None else beam
        if beam not in LIMITS["decode.beam"]:  # the same range as the config key
            raise CaptionerError(f"--beam must be {LIMITS['decode.beam']} (1 = greedy), got {beam}")
        return {
            "beam": beam,
            "length_penalty": decode_cfg.length_penalty,
            "no_repeat_ngram": decode_cfg.no_repeat_ngram,
            "max_length": decode_cfg.max_length or self.vocab.max_length,
        }

    def caption_features(self, features: np.ndarray, beam: int | None = None) -> list[str]:
        """Captions for precomputed features (N, D) of this run's encoder."""
        from captioner import decode

        if len(features) == 0:
            return []
        ids = decode.decode(self.model, features, **self.decode_settings(beam))
        return [self.vocab.decode(words) for words in ids]

    def caption_files(
        self, paths: Sequence[str | Path], beam: int | None = None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """([(path, caption)] for readable images, [(path, reason)] for the others)."""
        if self.encoder is None:
            raise CaptionerError(f"{self.run_dir}: loaded without its encoder; use load_run()")
        if not paths:
            return [], []
        features, ok_paths, failures = self.encoder.encode_files(
            [str(p) for p in paths], batch_size=self.cfg.features.batch_size
        )
        captions = self.caption_features(features, beam)
        return list(zip(ok_paths, captions, strict=True)), list(failures)


def load_run(
    run_dir: str | Path, with_encoder: bool = True, encoders: dict[tuple, Any] | None = None
) -> LoadedRun:
    """Load a run directory; `encoders` is a cache shared between runs (same encoder, one copy)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise CaptionerError(
                f"{run_dir}: no {name}, not a finished training run; train "
                "one with `captioner train` or pass another --model/--run"
            )
    from captioner.model import load_saved  # also registers the model's custom layers

    state_path = run_dir / "state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    if not state.get("finished"):
        log(
            f"{run_dir}: training not finished ({state.get('epoch', '?')}/"
            f"{state.get('epochs', '?')} epochs); using its best model so far"
        )
    cfg = from_dict(read_json(run_dir / "config.json"))
    vocab = Vocabulary.load(run_dir / "vocab.json")
    model = load_saved(run_dir / "model.keras", "copy the run again, or train it again")
    if model.get_layer("logits").units != vocab.size:
        raise CaptionerError(
            f"{run_dir}: model.keras predicts {model.get_layer('logits').units}"
            f" words but vocab.json has {vocab.size}; the run is inconsistent"
        )
    meta = read_json(run_dir / "features_meta.json")
    run = LoadedRun(run_dir, cfg, vocab, model, meta)
    if with_encoder:
        run.encoder = _shared_encoder(meta, run_dir, {} if encoders is None else encoders)
    return run


def _shared_encoder(meta: dict, run_dir: Path, encoders: dict[tuple, Any]):
    """The encoder that made the run's features: same network, weights, seed and precision."""
    from captioner.features import build_encoder

    try:
        key = (
            meta["encoder"],
            meta["weights"],
            meta.get("precision", "auto"),
            meta.get("seed") or 0,
        )
    except KeyError as error:
        raise CaptionerError(
            f"{run_dir / 'features_meta.json'}: no {error} entry; "
            "retrain with the current captioner"
        ) from None
    if key not in encoders:
        encoders[key] = build_encoder(key[0], key[1], key[2], seed=key[3])
    return encoders[key]


def latest_run(runs_dir: str | Path) -> Path:
    """The most recently finished run under runs_dir (state.json says finished; newest wins)."""
    runs_dir = Path(runs_dir)
    finished = []
    for state_path in runs_dir.glob("*/state.json"):
        try:
            done = read_json(state_path).get("finished")
        except (CaptionerError, AttributeError):
            continue  # a damaged run is not a candidate
        if done and (state_path.parent / "model.keras").is_file():
            finished.append((state_path.stat().st_mtime, state_path.parent))
    if not finished:
        raise CaptionerError(
            f"{runs_dir}: no finished run found; train one with `captioner "
            "train --dataset demo` (offline) or pass --model RUN"
        )
    return max(finished)[1]


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
            str(p)
            for p in path.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
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
) -> int:
    """Print image<TAB>model<TAB>caption (or JSON lines) per image and model, chunk by chunk as
    they are made, with a progress bar on stderr; return the number of images (or folders without
    images) that failed, each also named on stderr."""
    from tqdm import tqdm

    if not runs:
        runs = [str(latest_run(runs_dir))]
        log(f"using the latest finished run {runs[0]} (choose with --model)")
    paths, empty_folders = expand_images(images)
    for folder, reason in empty_folders:
        log(f"{folder}: {reason}")
    encoders: dict[tuple, Any] = {}
    loaded = [load_run(run, encoders=encoders) for run in dict.fromkeys(runs)]
    failed = 0
    with tqdm(
        total=len(paths), unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True
    ) as progress:
        for start in range(0, len(paths), STREAM_CHUNK):
            chunk = paths[start : start + STREAM_CHUNK]
            failed += _print_chunk(chunk, _caption_chunk(loaded, chunk, beam), loaded, as_json)
            progress.update(len(chunk))
    return failed + len(empty_folders)


def _caption_chunk(
    loaded: Sequence[LoadedRun], chunk: Sequence[str], beam: int | None
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """([{path: caption}] per run, {path: reason} of unreadable images); each image is encoded
    once per distinct encoder, however many runs share it."""
    encoded: dict[int, tuple[np.ndarray, list[str]]] = {}
    failed: dict[str, str] = {}
    captions = []
    for run in loaded:
        if id(run.encoder) not in encoded:
            features, ok, failures = run.encoder.encode_files(
                chunk, batch_size=run.cfg.features.batch_size
            )
            encoded[id(run.encoder)] = (features, ok)
            for path, reason in failures:
                failed.setdefault(path, reason)
        features, ok = encoded[id(run.encoder)]
        captions.append(dict(zip(ok, run.caption_features(features, beam), strict=True)))
    return captions, failed


def _print_chunk(
    chunk: Sequence[str],
    results: tuple[list[dict[str, str]], dict[str, str]],
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
