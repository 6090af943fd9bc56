"""`captioner evaluate`: caption one split of the run's dataset and score it against its references.

Writes into the run directory, one pair per split and decoding settings (run_data.py names
them, e.g. metrics-test-beam3.json, predictions-test-beam3.csv):
  metrics-<tag>.json      scores (BLEU-1..4, CIDEr-D, ROUGE-L, METEOR when Java is present), the
                          split, the decoding settings, the number of images, the data scored
                          (captions sha256) and the notebook-style BLEU (start/end words
                          counted) for comparison with the old approach
  predictions-<tag>.csv   image, caption, references (joined by " | ")
  README.md               the model card (card.py), rewritten with every evaluation
and prints a small table on stdout. The captions must be those the run was trained on (its
data.json); features come from the dataset's feature cache, which must have been made by the
encoder the run was trained on (features_meta.json).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from captioner import captions, metrics, run_data
from captioner.card import write_card
from captioner.config import replace
from captioner.errors import CaptionerError
from captioner.io import atomic_write_bytes, file_sha256, log, read_json, write_json
from captioner.loaded_run import LoadedRun, load_run

CHUNK = 500  # images per decoding call: the unit of progress
# Feature-cache settings that must match the run's features_meta.json.
SAME_FEATURES = ("encoder", "weights", "seed", "precision", "dim")
LABELS = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "cider_d": "CIDEr-D",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
}


def evaluate(
    run_dir: str | Path,
    split: str = "test",
    beam: int | None = None,
    data_dir: str | None = None,
    with_meteor: bool = True,
) -> Path:
    """Score the run on `split`; return the path of its metrics file (reused when up to date)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, with_encoder=False)
    if data_dir is not None:
        run.cfg = replace(run.cfg, **{"data.data_dir": data_dir})
    decoding = run.decode_settings(beam)  # resolved once: run's config plus --beam
    settings = decoding.to_dict()
    references = split_references(run, split)
    data = run_data.check(run_dir, run.cfg)  # refuses captions the run was not trained on
    scored = {
        "captions_sha256": data["captions_sha256"],
        "images_sha256": data["splits"][split]["images_sha256"],
    }
    tag = run_data.result_tag(split, settings, run.vocab.max_length)
    metrics_path, predictions_path = run_data.result_paths(run_dir, tag)
    model_sha256 = file_sha256(run_dir / "model.keras")
    expected = {"split": split, "decoding": settings, "data": scored, "model_sha256": model_sha256}
    previous = _previous(metrics_path, predictions_path, expected)
    if previous is not None:
        log(f"reusing {metrics_path}")
        print_table(previous)
        log(f"model card {write_card(run_dir)}")
        return metrics_path

    images, cache, rows = split_rows(run, references)
    hypotheses: list[str] = []
    with tqdm(
        total=len(images),
        unit="img",
        desc=f"captioning {split}",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        for start in range(0, len(images), CHUNK):
            # rows as stored, one chunk at a time: a grid cache is never read whole
            chunk = cache.features[rows[start : start + CHUNK]]
            hypotheses += run.caption_features(chunk, decoding)
            progress.update(min(CHUNK, len(images) - start))
    refs = [references[image] for image in images]
    scores, notes = metrics.score_all(hypotheses, refs, with_meteor=with_meteor)
    result = {
        "run": str(run_dir),
        "split": split,
        "images": len(images),
        "skipped_images": len(references) - len(images),
        "decoding": settings,
        "metrics": scores,
        "bleu_reference_style": metrics.bleu_reference_style(hypotheses, refs),
        "notes": notes,
        "data": scored,
        "model_sha256": model_sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    table = pd.DataFrame(
        {"image": images, "caption": hypotheses, "references": [" | ".join(r) for r in refs]}
    )
    atomic_write_bytes(predictions_path, table.to_csv(index=False).encode())
    write_json(metrics_path, result)  # last: its presence means a finished evaluation
    print_table(result)
    log(f"model card {write_card(run_dir)}")  # rewritten with every evaluation
    return metrics_path


def _previous(path: Path, predictions: Path, expected: dict) -> dict | None:
    """The stored result if it scored the same split, images and captions with the same model
    and decoding settings, else None."""
    if not path.is_file() or not predictions.is_file():
        return None
    try:
        stored = read_json(path)
    except CaptionerError:
        return None  # damaged: evaluate again
    same = isinstance(stored, dict) and all(stored.get(k) == v for k, v in expected.items())
    return stored if same else None


def split_references(run: LoadedRun, split: str) -> dict[str, list[str]]:
    """{image: its clean captions} for the split, images in captions.csv order."""
    cfg = run.cfg
    if not cfg.captions_csv.is_file():
        raise CaptionerError(
            f"{cfg.captions_csv}: not found; pass --data-dir DIR where the run's "
            f"dataset '{cfg.data.dataset}' lives (DIR/{cfg.data.dataset}/)"
        )
    frame, _ = captions.load_captions(cfg)
    rows = captions.split_rows(frame, split)
    if rows.empty:
        found = ", ".join(sorted(set(frame["split"]))) or "none"
        raise CaptionerError(
            f"{cfg.captions_csv}: no images in split '{split}' (splits: "
            f"{found}); pass --split with one of them"
        )
    return captions.references(rows)


def split_rows(
    run: LoadedRun, references: dict[str, list[str]]
) -> tuple[list[str], Any, np.ndarray]:
    """Images of the split that have a feature row, the run's feature cache (checked to be the
    one the run was trained on), and those images' row numbers (N,)."""
    from captioner.feature_cache import layout_of, load_cache

    cache = load_cache(run.cfg.features_dir)
    found = {key: cache.meta.get(key) for key in SAME_FEATURES}
    wanted = {key: run.features_meta.get(key) for key in SAME_FEATURES}
    found["layout"], wanted["layout"] = layout_of(cache.meta), layout_of(run.features_meta)
    for key in found:
        if found[key] != wanted[key]:
            raise CaptionerError(
                f"{cache.path / 'meta.json'}: {key}={found[key]!r}, but run "
                f"{run.run_dir} was trained on {key}={wanted[key]!r}; extract "
                "features with the run's settings (see its features_meta.json)"
            )
    images = [image for image in references if image in cache.row]
    if len(images) < len(references):
        log(
            f"{len(references) - len(images)} images of the split have no features (unreadable "
            "or missing); scored without them"
        )
    if not images:
        raise CaptionerError(
            f"{cache.path}: none of the split's images has features; "
            "run `captioner features` for this dataset"
        )
    return images, cache, np.array([cache.row[image] for image in images], np.int64)


def split_features(
    run: LoadedRun, references: dict[str, list[str]]
) -> tuple[list[str], np.ndarray]:
    """Images of the split that have a feature row, and their features float32 in the shape the
    run's decoder takes: (N, D), or (N, H, W, C) (all at once: for benchmarks of a split)."""
    from captioner.models import features_of

    images, cache, rows = split_rows(run, references)
    decoder = run.cfg.model.decoder
    return images, cache.rows(rows, features_of(decoder), decoder)


def print_table(result: dict[str, Any]) -> None:
    """The scores of one evaluation, with the split and decoding named, on stdout."""
    d = result["decoding"]
    print(
        f"{result['run']}: split {result['split']}, {result['images']} images, beam "
        f"{d['beam']}, length_penalty {d['length_penalty']}, no_repeat_ngram "
        f"{d['no_repeat_ngram']}, max_length {d['max_length']}"
    )
    old = result["bleu_reference_style"]
    for key, value in result["metrics"].items():
        extra = f"   (start/end counted, as the notebook did: {old[key]:.3f})" if key in old else ""
        print(f"  {LABELS.get(key, key):<8} {value:.3f}{extra}")
    for note in result.get("notes", []):
        print(f"  note: {note}")
