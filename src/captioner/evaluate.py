"""`captioner evaluate`: caption one split of the run's dataset and score it against its references.

Writes into the run directory:
  metrics.json      scores (BLEU-1..4, CIDEr-D, ROUGE-L, METEOR when Java is present), the split,
                    the decoding settings, the number of images, and the notebook-style BLEU
                    (start/end words counted) for comparison with the old approach
  predictions.csv   image, caption, references (joined by " | ")
  README.md         the model card (card.py), rewritten with every evaluation
and prints a small table on stdout. Features come from the dataset's feature cache, which must
have been made by the encoder the run was trained on (features_meta.json).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from captioner import metrics
from captioner.caption import LoadedRun, load_run
from captioner.card import write_card
from captioner.config import replace
from captioner.errors import CaptionerError
from captioner.io import atomic_write_bytes, log, read_json, write_json

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
    """Score the run on `split`; return the path of metrics.json (reused when up to date)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, with_encoder=False)
    if data_dir is not None:
        run.cfg = replace(run.cfg, **{"data.data_dir": data_dir})
    settings = run.decode_settings(beam)
    metrics_path = run_dir / "metrics.json"
    model_sha256 = hashlib.sha256((run_dir / "model.keras").read_bytes()).hexdigest()
    previous = _previous(metrics_path, split, settings, model_sha256)
    if previous is not None:
        log(f"reusing {metrics_path}")
        print_table(previous)
        log(f"model card {write_card(run_dir)}")
        return metrics_path

    references = split_references(run, split)
    images, features = split_features(run, references)
    hypotheses: list[str] = []
    with tqdm(
        total=len(images),
        unit="img",
        desc=f"captioning {split}",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        for start in range(0, len(images), CHUNK):
            hypotheses += run.caption_features(features[start : start + CHUNK], settings["beam"])
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
        "model_sha256": model_sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    table = pd.DataFrame(
        {"image": images, "caption": hypotheses, "references": [" | ".join(r) for r in refs]}
    )
    atomic_write_bytes(run_dir / "predictions.csv", table.to_csv(index=False).encode())
    write_json(metrics_path, result)  # last: its presence means a finished evaluation
    print_table(result)
    log(f"model card {write_card(run_dir)}")  # rewritten with every evaluation
    return metrics_path


def _previous(path: Path, split: str, settings: dict, model_sha256: str) -> dict | None:
    """The stored result if it was made on the same split, settings and model, else None."""
    if not path.is_file() or not (path.parent / "predictions.csv").is_file():
        return None
    try:
        stored = read_json(path)
    except CaptionerError:
        return None  # damaged: evaluate again
    same = (
        isinstance(stored, dict)
        and stored.get("split") == split
        and stored.get("decoding") == settings
        and stored.get("model_sha256") == model_sha256
    )
    return stored if same else None


def split_references(run: LoadedRun, split: str) -> dict[str, list[str]]:
    """{image: its clean captions} for the split, images in captions.csv order."""
    from captioner.clean import load_captions

    cfg = run.cfg
    if not cfg.captions_csv.is_file():
        raise CaptionerError(
            f"{cfg.captions_csv}: not found; pass --data-dir DIR where the run's "
            f"dataset '{cfg.data.dataset}' lives (DIR/{cfg.data.dataset}/)"
        )
    frame, _ = load_captions(cfg)
    rows = frame[frame["split"] == split]
    if rows.empty:
        found = ", ".join(sorted(set(frame["split"]))) or "none"
        raise CaptionerError(
            f"{cfg.captions_csv}: no images in split '{split}' (splits: "
            f"{found}); pass --split with one of them"
        )
    references: dict[str, list[str]] = {}
    for image, caption in zip(rows["image"], rows["caption"], strict=True):
        references.setdefault(image, []).append(caption)
    return references


def split_features(
    run: LoadedRun, references: dict[str, list[str]]
) -> tuple[list[str], np.ndarray]:
    """Images of the split that have a feature row, and their features (N, D) float32."""
    from captioner.feature_cache import load_cache

    cache = load_cache(run.cfg.features_dir)
    for key in SAME_FEATURES:
        if cache.meta.get(key) != run.features_meta.get(key):
            raise CaptionerError(
                f"{cache.path / 'meta.json'}: {key}={cache.meta.get(key)!r}, but run "
                f"{run.run_dir} was trained on {key}={run.features_meta.get(key)!r}; extract "
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
    rows = np.array([cache.row[image] for image in images])
    return images, np.asarray(cache.features[rows], dtype=np.float32)


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
