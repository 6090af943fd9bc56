"""A run directory: create it, reopen it for --resume, commit each epoch (loaded_run.py loads it
for inference).

    runs/<name>/
      config.json versions.json vocab.json features_meta.json data.json   written before training
      state.json          the commit point, rewritten after every epoch (see below)
      checkpoints/epoch-NNNN.keras   the last and the best epoch, each with its optimizer state
      model.keras         a copy of the best checkpoint (lowest validation loss)
      history.csv         epoch,loss,val_loss, rewritten from state.json
      logs/ training.json TensorBoard logs, training time and machine (monitor.py)
      README.md           the model card (card.py), once training has finished

state.json = {"epoch", "epochs", "finished", "best_val_loss", "best_epoch", "wait" (epochs
without improvement, for early stopping), "checkpoint", "best_checkpoint", "history"}. Every file
is complete before state.json names it, so after a kill -9 at any moment state.json describes a
consistent run, and `--resume` continues from the epoch it names with the optimizer it saved.

Reading and listing runs without TensorFlow is runs.py's job.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from captioner import run_data
from captioner.config import Config, from_dict
from captioner.errors import CaptionerError
from captioner.io import (
    atomic_write_bytes,
    git_commit,
    library_versions,
    log,
    read_json,
    write_json,
)
from captioner.runs import is_finished

# Settings that decide what a run trains; a --resume with other values would mix two runs.
# train.epochs and train.patience only decide when it stops: a --resume may change them (extend).
RESUME_KEYS = (
    "seed",
    "data.dataset",
    "data.split",
    "features.encoder",
    "tokenizer",
    "model",
    "train.batch_size",
    "train.learning_rate",
    "train.lr_decay",
    "train.precision",
    "train.shuffle_buffer",
)


# --- training: create, reopen, commit ------------------------------------------------------------
def locate(cfg: Config, resume: bool) -> Path:
    """runs/<name>; for --resume without a name, the newest unfinished run of this dataset."""
    runs_dir = Path(cfg.train.runs_dir)
    prefix = f"{cfg.data.dataset}-{cfg.features.encoder}-"
    if cfg.train.name:
        return runs_dir / cfg.train.name
    if not resume:
        return runs_dir / (prefix + time.strftime("%Y%m%d-%H%M%S"))
    unfinished = [
        path
        for path in sorted(runs_dir.glob(prefix + "*"))
        if path.is_dir() and not is_finished(path)
    ]
    if not unfinished:
        raise CaptionerError(
            f"{runs_dir}: no unfinished run '{prefix}*' to resume; "
            "pass --name NAME, or drop --resume to start a new run"
        )
    return unfinished[-1]


def initial_state(cfg: Config) -> dict[str, Any]:
    return {
        "epoch": 0,
        "epochs": cfg.train.epochs,
        "finished": False,
        "best_val_loss": None,
        "best_epoch": 0,
        "wait": 0,
        "checkpoint": None,
        "best_checkpoint": None,
        "history": [],
    }


def read_state(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / "state.json")


def check_can_start(run_dir: Path, resume: bool) -> None:
    """Before any long work: a finished run is never overwritten, a missing one not resumed."""
    if resume and not run_dir.is_dir():
        raise CaptionerError(f"{run_dir}: no such run to resume; drop --resume to start it")
    if not resume and run_dir.exists():
        raise CaptionerError(
            f"{run_dir}: a run of this name exists; add --resume to continue "
            "it, or choose another --name"
        )


def open_run(run_dir: Path, cfg: Config, resume: bool, paths: dict[str, Path]) -> dict:
    """Create a new run (state.json last), or check and reopen one for --resume."""
    state_path = run_dir / "state.json"
    if resume and state_path.is_file():
        _check_resumable(run_dir, cfg, paths)
        state = extend(run_dir, read_json(state_path), cfg)
        saved = read_json(run_dir / "config.json")
        saved["train"].update(epochs=cfg.train.epochs, patience=cfg.train.patience)
        write_json(run_dir / "config.json", saved)
        publish(run_dir, state, copy_best=True)  # finish what a kill may have interrupted
        return state
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "versions.json", {**library_versions(), "git_commit": git_commit()})
    write_json(run_dir / "vocab.json", read_json(paths["vocab"]))
    write_json(run_dir / "features_meta.json", read_json(Path(paths["features"]) / "meta.json"))
    run_data.pin(run_dir, cfg)  # data.json: evaluate refuses captions the run did not train on
    state = initial_state(cfg)
    publish(run_dir, state, copy_best=False)  # state.json and an empty history.csv
    log(f"run directory {run_dir}")
    return state


def extend(run_dir: Path, state: dict, cfg: Config) -> dict:
    """The run's state under this command's train.epochs and train.patience: a resume may
    raise them to train a finished run further (never below the epochs already done)."""
    epochs, patience = cfg.train.epochs, cfg.train.patience
    if epochs < state["epoch"]:
        raise CaptionerError(
            f"{run_dir}: {state['epoch']} epochs are done; train.epochs={epochs} is fewer"
        )
    if epochs != state["epochs"]:
        log(f"{run_dir}: train.epochs {state['epochs']} -> {epochs}")
    stopped = stopped_early(state, patience)
    return {**state, "epochs": epochs, "finished": stopped or state["epoch"] >= epochs}


def stopped_early(state: dict, patience: int) -> bool:
    """Early stopping's rule: `patience` epochs in a row without a lower val_loss (0 = never)."""
    return patience > 0 and state["wait"] >= patience


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _check_resumable(run_dir: Path, cfg: Config, paths: dict[str, Path]) -> None:
    """The same settings and the same vocabulary and features as when the run started."""
    # keys added since the run started (model.decoder, model.attention_units, ...) read as
    # their defaults, as from_dict reads them
    saved, now = _flatten(read_config(run_dir).to_dict()), _flatten(cfg.to_dict())
    for key in sorted(now):
        if key.startswith(RESUME_KEYS) and saved.get(key) != now[key]:
            raise CaptionerError(
                f"{run_dir / 'config.json'}: the run has {key}={saved.get(key)!r}"
                f", this command {now[key]!r}; resume with the run's settings "
                "or start a new run with another --name"
            )
    inputs = {
        "vocab.json": paths["vocab"],
        "features_meta.json": Path(paths["features"]) / "meta.json",
    }
    for name, current in inputs.items():
        if read_json(run_dir / name) != read_json(current):
            raise CaptionerError(
                f"{current}: changed since run {run_dir} started (its copy is "
                f"{run_dir / name}); start a new run with another --name"
            )


def save_checkpoint(model: Any, run_dir: Path, state: dict) -> None:
    """The model (with its optimizer state, so a resume continues Adam) as state["checkpoint"]."""
    path = run_dir / state["checkpoint"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.keras")
    model.save(partial)
    os.replace(partial, path)


def publish(run_dir: Path, state: dict, copy_best: bool) -> None:
    """Commit state.json, then derive history.csv, model.keras and prune old checkpoints."""
    write_json(run_dir / "state.json", state)
    lines = ["epoch,loss,val_loss"] + [
        f"{row['epoch']},{row['loss']!r},{row['val_loss']!r}" for row in state["history"]
    ]
    atomic_write_bytes(run_dir / "history.csv", ("\n".join(lines) + "\n").encode())
    if copy_best and state["best_checkpoint"]:
        partial = run_dir / "model.partial.keras"
        shutil.copyfile(run_dir / state["best_checkpoint"], partial)
        os.replace(partial, run_dir / "model.keras")
    keep = {state["checkpoint"], state["best_checkpoint"]}
    for path in (run_dir / "checkpoints").glob("*.keras"):
        if f"checkpoints/{path.name}" not in keep:
            path.unlink()


# --- reading ------------------------------------------------------------------------------------
def read_config(run_dir: str | Path) -> Config:
    """The run's resolved settings (config.json), checked like any other configuration."""
    return from_dict(read_json(Path(run_dir) / "config.json"))
