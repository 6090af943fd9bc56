"""Run directories: read what `captioner train` and `captioner evaluate` left in one, list many.

A run directory (see train.py) holds config.json, state.json, features_meta.json, model.keras and,
once evaluated, metrics.json (or metrics-<...>.json, one per evaluation). Reading never raises for
a damaged or half-written run: the problem is recorded in `RunSummary.problem` instead, so a
listing of many runs shows every one of them. No TensorFlow here: `captioner runs` is instant.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from captioner.config import ModelConfig
from captioner.errors import CaptionerError
from captioner.io import read_json

# Files of which any one makes a folder a run directory (the first two are written first).
RUN_FILES = ("config.json", "state.json", "model.keras")
DEFAULT_DECODER = ModelConfig.decoder  # runs made before model.decoder existed
# --sort columns: name -> (key of a summary, higher is better?)
SORT_COLUMNS = {
    "name": False,
    "dataset": False,
    "encoder": False,
    "decoder": False,
    "epochs": False,
    "best_dev_loss": False,
    "status": False,
    "bleu4": True,
    "cider_d": True,
}


@dataclass
class Evaluation:
    """One evaluation of a run: where it was scored, how it decoded, its scores."""

    split: str
    beam: int | None
    bleu4: float | None
    cider_d: float | None
    file: str
    created: str = ""
    images: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # every finite score by key


@dataclass
class RunSummary:
    """What a listing shows of one run. status: finished, unfinished or broken."""

    name: str
    path: str
    status: str
    dataset: str = ""
    encoder: str = ""
    weights: str = ""
    decoder: str = ""
    epoch: int | None = None
    epochs: int | None = None
    best_dev_loss: float | None = None
    evaluations: list[Evaluation] = field(default_factory=list)
    problem: str = ""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "finished": self.finished}


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def is_finished(run_dir: Path) -> bool:
    """state.json says the run finished (a damaged state.json raises CaptionerError)."""
    state_path = Path(run_dir) / "state.json"
    return state_path.is_file() and bool(read_json(state_path).get("finished"))


def latest_run(runs_dir: str | Path) -> Path:
    """The most recently finished run under runs_dir (state.json says finished; newest wins)."""
    runs_dir = Path(runs_dir)
    finished = []
    for state_path in runs_dir.glob("*/state.json"):
        try:
            done = _read_object(state_path).get("finished")
        except CaptionerError:
            continue  # a damaged run is not a candidate
        if done and (state_path.parent / "model.keras").is_file():
            finished.append((state_path.stat().st_mtime, state_path.parent))
    if not finished:
        raise CaptionerError(
            f"{runs_dir}: no finished run found; train one with `captioner "
            "train --dataset demo` (offline) or pass --model RUN"
        )
    return max(finished)[1]


def _read_object(path: Path) -> dict[str, Any]:
    """A JSON object from path; CaptionerError naming the file when missing or damaged."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"{path.name} missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaptionerError(f"{path.name} unreadable ({type(error).__name__})") from None
    if not isinstance(value, dict):
        raise CaptionerError(f"{path.name} is not a JSON object")
    return value


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def metrics_files(run_dir: Path) -> list[Path]:
    """metrics.json and every metrics*.json of the run (one per evaluation), by name."""
    return sorted(path for path in Path(run_dir).glob("metrics*.json") if path.is_file())


def read_evaluations(run_dir: Path) -> list[Evaluation]:
    """Every readable evaluation of the run, oldest first; damaged metrics files are skipped."""
    found = []
    for path in metrics_files(run_dir):
        try:
            stored = _read_object(path)
        except CaptionerError:
            continue
        scores = stored.get("metrics")
        decoding = stored.get("decoding")
        if not isinstance(scores, dict):
            continue
        found.append(
            Evaluation(
                split=str(stored.get("split", "?")),
                beam=_integer(decoding.get("beam")) if isinstance(decoding, dict) else None,
                bleu4=_number(scores.get("bleu4")),
                cider_d=_number(scores.get("cider_d")),
                file=path.name,
                created=str(stored.get("created", "")),
                images=_integer(stored.get("images")),
                scores={k: v for k, v in scores.items() if _number(v) is not None},
            )
        )
    return sorted(found, key=lambda e: (e.created, e.file))


def read_run(run_dir: Path) -> RunSummary:
    """The summary of one run directory; never raises for a damaged run (see `problem`)."""
    run_dir = Path(run_dir)
    summary = RunSummary(name=run_dir.name, path=str(run_dir), status="broken")
    try:
        config = _read_object(run_dir / "config.json")
        summary.dataset = str(_section(config, "data").get("dataset", ""))
        summary.encoder = str(_section(config, "features").get("encoder", ""))
        summary.weights = str(_section(config, "features").get("weights", ""))
        summary.decoder = str(_section(config, "model").get("decoder", DEFAULT_DECODER))
        summary.epochs = _integer(_section(config, "train").get("epochs"))
    except CaptionerError as error:
        summary.problem = str(error)
    summary.evaluations = read_evaluations(run_dir)
    try:
        state = _read_object(run_dir / "state.json")
    except CaptionerError as error:
        summary.problem = summary.problem or str(error)
        return summary
    summary.epoch = _integer(state.get("epoch"))
    summary.epochs = _integer(state.get("epochs")) or summary.epochs
    summary.best_dev_loss = _number(state.get("best_val_loss"))
    if summary.problem:
        return summary  # the state is readable but the run's settings are not: still broken
    if state.get("finished") is True:
        if (run_dir / "model.keras").is_file():
            summary.status = "finished"
        else:
            summary.problem = "model.keras missing"
    else:
        summary.status = "unfinished"
    return summary


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name, {})
    if not isinstance(section, dict):
        raise CaptionerError(f"config.json: '{name}' is not a table")
    return section


def list_runs(runs_dir: Path, sort: str = "name") -> list[RunSummary]:
    """Every run directory directly under runs_dir (other folders are left out), sorted."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise CaptionerError(
            f"{runs_dir}: no such folder; train a run with `captioner train` or pass --runs-dir"
        )
    if sort not in SORT_COLUMNS:
        raise CaptionerError(f"--sort {sort}: unknown column; use one of {', '.join(SORT_COLUMNS)}")
    summaries = [read_run(path) for path in sorted(runs_dir.iterdir()) if is_run_dir(path)]
    return sorted(summaries, key=lambda s: _sort_key(s, sort))


def best_score(summary: RunSummary, metric: str) -> float | None:
    """The run's best score on metric (bleu4 or cider_d) over its evaluations."""
    values = [getattr(e, metric) for e in summary.evaluations if getattr(e, metric) is not None]
    return max(values) if values else None


def _sort_key(summary: RunSummary, column: str) -> tuple:
    """Missing values last; scores best (highest) first, everything else ascending."""
    if column in ("bleu4", "cider_d"):
        value = best_score(summary, column)
        return (value is None, -(value or 0.0), summary.name)
    if column == "epochs":
        value = summary.epoch
    else:
        value = getattr(summary, column)
    return (value is None or value == "", value if value is not None else 0, summary.name)


# --- printing ------------------------------------------------------------------------------------
COLUMNS = ("name", "dataset", "encoder", "decoder", "epochs", "best_dev_loss", "status", "scores")


def _cells(summary: RunSummary) -> list[str]:
    epochs = f"{_text(summary.epoch)}/{_text(summary.epochs)}"
    loss = "-" if summary.best_dev_loss is None else f"{summary.best_dev_loss:.4f}"
    status = summary.status + (f" ({summary.problem})" if summary.problem else "")
    scores = "; ".join(
        f"{e.split} beam {_text(e.beam)}: BLEU-4 {_score(e.bleu4)} CIDEr-D {_score(e.cider_d)}"
        for e in summary.evaluations
    )
    return [
        summary.name,
        summary.dataset or "-",
        summary.encoder or "-",
        summary.decoder or "-",
        epochs,
        loss,
        status,
        scores or "-",
    ]


def _text(value: Any) -> str:
    return "?" if value is None else str(value)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(summaries: list[RunSummary]) -> str:
    """A plain-text table, one row per run, columns padded to their widest cell."""
    rows = [list(COLUMNS)] + [_cells(s) for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def format_json(summaries: list[RunSummary]) -> str:
    return json.dumps([s.to_dict() for s in summaries], indent=2)
