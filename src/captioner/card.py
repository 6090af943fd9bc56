"""The model card: README.md in a run directory, made from the run's own files.

Written when training finishes and again after every `captioner evaluate`, so it always shows
every evaluation done. It states the data, encoder, decoder and sizes, how long training took on
which machine, the scores, a few sample captions, and how to caption with and export the model.
Everything is read generously: a missing file leaves its line out, it never stops the card.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from captioner.feature_cache import layout_of
from captioner.io import atomic_write_bytes
from captioner.runs import RunSummary, read_evaluations, read_run

CARD_FILE = "README.md"
SAMPLES = 5  # sample captions shown from the latest evaluation
SCORE_COLUMNS = {
    "bleu1": "BLEU-1",
    "bleu4": "BLEU-4",
    "cider_d": "CIDEr-D",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
}


def write_card(run_dir: str | Path) -> Path:
    """(Re)write run_dir/README.md; return its path."""
    run_dir = Path(run_dir)
    path = run_dir / CARD_FILE
    atomic_write_bytes(path, render_card(run_dir).encode("utf-8"))
    return path


def render_card(run_dir: Path) -> str:
    summary = read_run(run_dir)
    files = {name: _read(run_dir / f"{name}.json") for name in _JSON_FILES}
    sections = [
        _header(summary, files),
        _evaluations(run_dir),
        _samples(run_dir),
        _usage(run_dir),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


_JSON_FILES = ("config", "state", "vocab", "features_meta", "versions", "training")


MODEL_KEYS = ("cell", "units", "embed_dim", "dropout", "attention_units", "doubly_stochastic")


def _decoder_row(decoder: str, files: dict[str, Any]) -> str:
    """The decoder and its sizes; for attention also its attention width and the weight of its
    doubly stochastic regularisation."""
    model = {key: _get(files, "config", "model", key) for key in MODEL_KEYS}
    row = (
        f"{decoder}: {str(model['cell']).upper()} {model['units']} units, embedding "
        f"{model['embed_dim']}, dropout {model['dropout']}"
    )
    if decoder == "attention":
        row += (
            f", attention {model['attention_units']} units, doubly stochastic "
            f"regularisation {model['doubly_stochastic']}"
        )
    return row


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _get(files: dict, name: str, *keys: str, default: Any = "?") -> Any:
    value: Any = files.get(name, {})
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return default if value is None else value


def _features(meta: Any) -> str:
    """The features, for the card: 4096-d features, or 7x7 grid of 512-d features (112x112
    images) for a grid cache (features_meta.json)."""
    meta = meta if isinstance(meta, dict) else {}
    text = f"{meta.get('dim', '?')}-d features"
    _, grid = layout_of(meta)
    if grid is None:
        return text
    text = f"{grid[0]}x{grid[1]} grid of {text}"
    size = meta.get("input_size")  # absent from caches made by other models
    return f"{text} ({size[0]}x{size[-1]} images)" if isinstance(size, list) and size else text


def _header(summary: RunSummary, files: dict) -> str:
    vocab = files["vocab"]
    epochs_done = f"{_text(summary.epoch)} of {_text(summary.epochs)} epochs"
    best = (
        f"best dev loss {summary.best_dev_loss:.4f} at epoch {_get(files, 'state', 'best_epoch')}"
        if summary.best_dev_loss is not None
        else "no epoch finished"
    )
    rows = {
        "status": summary.status + (f" ({summary.problem})" if summary.problem else ""),
        "dataset": f"{summary.dataset or '?'}, split {_get(files, 'config', 'data', 'split')}",
        "encoder": (
            f"{summary.encoder or '?'} (weights {_get(files, 'features_meta', 'weights')}), "
            f"{_features(files.get('features_meta', {}))}, "
            f"{_get(files, 'features_meta', 'precision')}"
        ),
        "decoder": _decoder_row(summary.decoder, files),
        "vocabulary": (
            f"{_get(files, 'vocab', 'size')} tokens (words seen at least "
            f"{_get(files, 'vocab', 'settings', 'min_count')} times in training), captions up "
            f"to {vocab.get('max_length', '?')} words"
        ),
        "training": (
            f"{epochs_done}, {best}; batch {_get(files, 'config', 'train', 'batch_size')}, "
            f"learning rate {_get(files, 'config', 'train', 'learning_rate')}, "
            f"seed {_get(files, 'config', 'seed')}"
        ),
        "time": _training_time(files["training"]),
        "software": (
            f"captioner {_get(files, 'versions', 'captioner')} "
            f"(commit {str(_get(files, 'versions', 'git_commit', default='') or '?')[:12]}), "
            f"TensorFlow {_get(files, 'versions', 'tensorflow')}, "
            f"Keras {_get(files, 'versions', 'keras')}"
        ),
    }
    lines = [
        f"# Model card: {summary.name}",
        "",
        "An image-captioning model trained with `captioner train`; this card is rewritten by "
        "`captioner evaluate`.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _training_time(training: dict) -> str:
    if "seconds" not in training:
        return "not recorded"
    seconds = float(training["seconds"])
    minutes, rest = divmod(round(seconds), 60)
    spent = f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"
    machine = training.get("machine", {})
    flags = ", ".join(machine.get("cpu_flags", [])) or "no AVX2"
    gpus = ", ".join(machine.get("gpus", [])) or "no GPU"
    return (
        f"{spent} over {training.get('epochs_timed', '?')} epochs on {machine.get('cpu', '?')} "
        f"({machine.get('cores', '?')} cores; {flags}), {gpus}"
    )


def _evaluations(run_dir: Path) -> str:
    found = read_evaluations(run_dir)
    if not found:
        return (
            "## Evaluations\n\nNot evaluated yet: "
            f"`captioner evaluate --run {run_dir} --split test --beam 3`."
        )
    head = ["split", "beam", "images", *SCORE_COLUMNS.values(), "date", "file"]
    lines = ["## Evaluations", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for evaluation in found:
        scores = [
            "-" if evaluation.scores.get(key) is None else f"{evaluation.scores[key]:.3f}"
            for key in SCORE_COLUMNS
        ]
        cells = [
            evaluation.split,
            _text(evaluation.beam),
            _text(evaluation.images),
            *scores,
            evaluation.created or "?",
            evaluation.file,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        "Start/end tokens are not counted (see the project README, 'Decoding and scores').",
    ]
    return "\n".join(lines)


def _samples(run_dir: Path) -> str:
    """The first SAMPLES rows of the newest predictions file: image, caption, a reference."""
    files = sorted(run_dir.glob("predictions*.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return ""
    try:
        with open(files[-1], newline="", encoding="utf-8") as handle:
            rows = [row for _, row in zip(range(SAMPLES), csv.DictReader(handle), strict=False)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return ""
    if not rows:
        return ""
    lines = [
        "## Sample captions",
        "",
        f"From `{files[-1].name}`, the latest evaluation.",
        "",
        "| image | generated | a reference |",
        "|---|---|---|",
    ]
    for row in rows:
        reference = (row.get("references") or "").split(" | ")[0]
        lines.append(
            f"| {_cell(row.get('image', ''))} | {_cell(row.get('caption') or '(empty)')} "
            f"| {_cell(reference)} |"
        )
    return "\n".join(lines)


def _usage(run_dir: Path) -> str:
    return f"""## Caption with it

```bash
captioner caption photo.jpg --model {run_dir}
captioner caption photos/ --model {run_dir} --json > captions.jsonl
```

```python
from captioner.caption import load_run

run = load_run("{run_dir}")
captions, failures = run.caption_files(["photo.jpg"])
```

## Export

```bash
captioner export --run {run_dir} exported/{run_dir.name}     # a TensorFlow SavedModel
captioner export --run {run_dir} --format tflite {run_dir.name}.tflite
captioner export --run {run_dir} --format tflite --quantize float16 {run_dir.name}-f16.tflite
```

The SavedModel needs TensorFlow only: its `serving_default` signature takes image file bytes
(`image_bytes`, tf.string) and returns `caption` and `log_prob`, as `captioner serve` does; the
TFLite model takes the pixels read as for training and returns the words (project README, "Use
your model elsewhere").
The run folder itself is the whole model too: `model.keras` (weights), `vocab.json` (words),
`config.json` (settings, decoding) and `features_meta.json` (the image encoder new images must
go through); `model.keras` loads in plain Keras with `keras.saving.load_model(path)` after
`import captioner.models`, which registers its layers."""


def _text(value: Any) -> str:
    return "?" if value is None else str(value)


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")
