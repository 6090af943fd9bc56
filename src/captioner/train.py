"""The train stage: fit the merge model on cached features, in a run directory that can resume.

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
Every input is read and checked before the run directory is made, and an epoch with a NaN or
infinite loss stops training before it is committed: a run is never "finished" on NaN.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import data, distribute, model, monitor, pipeline, run_data
from captioner.card import write_card
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import (
    atomic_write_bytes,
    git_commit,
    library_versions,
    log,
    read_json,
    set_seed,
    write_json,
)
from captioner.tokenizer import Vocabulary

# Settings that decide what a run trains; a --resume with other values would mix two runs.
# train.epochs and train.patience only decide when it stops: a --resume may change them (_extend).
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


def train(cfg: Config, resume: bool = False) -> Path:
    """Train in runs/<name>/ (running any missing earlier stage first); return the run dir."""
    if cfg.train.strategy == "multiworker" and not cfg.train.name:
        raise CaptionerError("--strategy multiworker needs --name, the same on every worker")
    chief = distribute.is_chief(cfg.train.strategy)
    run_dir = _run_dir(cfg, resume)
    if chief:  # before any long work: a finished run is never overwritten
        _check_can_start(run_dir, resume)
    # the strategy before other TF work: a multi-worker strategy must configure the runtime
    strategy = distribute.make_strategy(cfg.train.strategy)
    set_seed(cfg.seed)
    paths = pipeline.prepare(cfg)
    from captioner.feature_cache import load_cache

    cache = load_cache(paths["features"])
    # Every input is read and checked before the run directory is made (a resumed run's
    # vocabulary is checked equal to paths["vocab"]), so a refused start leaves nothing behind.
    vocab = Vocabulary.load(paths["vocab"])
    train_data, dev_data, train_rows = _datasets(cfg, vocab, cache)
    if chief:
        state = _open_run(run_dir, cfg, resume, paths)
    elif resume:  # other workers read the chief's run but write nothing
        state = _extend(run_dir, read_json(run_dir / "state.json"), cfg)
    else:
        state = _initial_state(cfg)
    if state["finished"]:
        log(
            f"{run_dir}: already finished ({state['epoch']} epochs); --resume with more "
            "--epochs (or a larger train.patience after early stopping) trains it further"
        )
        return run_dir

    log(
        f"vocabulary {vocab.size:,}, features {cache.features.shape[1]}-d, "
        f"{strategy.num_replicas_in_sync} replica(s); {state['epoch']}/{cfg.train.epochs} "
        "epochs done"
    )
    with strategy.scope():
        if state["checkpoint"]:  # resume: weights, optimizer state and its step count
            merge_model = model.load_saved(run_dir / state["checkpoint"], "start a new run")
        else:
            merge_model = _new_model(cfg, cache.features, train_rows, vocab.size)
    checkpoint = RunCheckpoint(run_dir, state, cfg.train.patience, cfg.train.lr_decay, write=chief)
    if cfg.train.strategy == "multiworker":
        distribute.fit_multiworker(
            strategy,
            merge_model,
            train_data,
            dev_data,
            cfg.train.epochs,
            state["epoch"],
            checkpoint,
        )
    else:
        # after the checkpoint each epoch: TensorBoard logs, dev captions, clock (monitor.py)
        callbacks = [checkpoint, *(monitor.callbacks(run_dir, cfg, cache, vocab) if chief else [])]
        _fit(merge_model, train_data, dev_data, cfg.train.epochs, state["epoch"], callbacks)
    log(f"{run_dir}: best val_loss {state['best_val_loss']:.4f} at epoch {state['best_epoch']}")
    if chief and state["finished"]:
        log(f"model card {write_card(run_dir)}")
    return run_dir


def _fit(
    merge_model: keras.Model,
    train_data,
    dev_data,
    epochs: int,
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    """Keras fit with its progress bar on stderr (stdout carries only the result)."""
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # Bucketed batches have no known count, so Keras finds each epoch's end by running out
        # of data and warns about it; that end is expected here.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        merge_model.fit(
            train_data,
            validation_data=dev_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            shuffle=False,
            verbose=1 if sys.stderr.isatty() else 2,
        )


def _datasets(cfg: Config, vocab: Vocabulary, cache: Any) -> tuple[Any, Any, np.ndarray]:
    """Training and dev tf.data pipelines, and the training captions' feature rows."""
    train_rows, train_captions = data.encode_split(
        data.read_split(cfg, "train"), vocab, cache.row, "train"
    )
    dev_rows, dev_captions = data.encode_split(data.read_split(cfg, "dev"), vocab, cache.row, "dev")
    if not dev_captions:
        raise CaptionerError(
            f"{cfg.captions_csv}: no dev captions with features; validation "
            "and early stopping need a dev split (see --split)"
        )
    batch = cfg.train.batch_size  # the global batch: split across replicas by tf.distribute
    train_data = data.make_dataset(
        cache.features,
        train_rows,
        train_captions,
        batch,
        shuffle=True,
        seed=cfg.seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
    )
    dev_data = data.make_dataset(  # bucketed: the same loss, less padding to compute
        cache.features, dev_rows, dev_captions, batch, shuffle=False, seed=cfg.seed, bucket=True
    )
    log(
        f"training on {len(train_captions):,} captions of {len(np.unique(train_rows)):,} "
        f"images, validating on {len(dev_captions):,}"
    )
    return train_data, dev_data, train_rows


def _new_model(
    cfg: Config, features: np.ndarray, train_rows: np.ndarray, vocab_size: int
) -> keras.Model:
    """A compiled merge model; feature statistics only when the model normalises features."""
    mean = variance = None
    if cfg.model.normalize_features:
        mean, variance = data.feature_stats(features, train_rows)
    merge_model = model.build_model(
        features.shape[1], vocab_size, cfg.model, mean, variance, precision=cfg.train.precision
    )
    model.compile_model(merge_model, cfg.train.learning_rate)
    return merge_model


# --- the run directory --------------------------------------------------------------------------
def _run_dir(cfg: Config, resume: bool) -> Path:
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
        if path.is_dir() and not _finished(path)
    ]
    if not unfinished:
        raise CaptionerError(
            f"{runs_dir}: no unfinished run '{prefix}*' to resume; "
            "pass --name NAME, or drop --resume to start a new run"
        )
    return unfinished[-1]


def _finished(run_dir: Path) -> bool:
    state_path = run_dir / "state.json"
    return state_path.is_file() and bool(read_json(state_path).get("finished"))


def _initial_state(cfg: Config) -> dict[str, Any]:
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


def _check_can_start(run_dir: Path, resume: bool) -> None:
    if resume and not run_dir.is_dir():
        raise CaptionerError(f"{run_dir}: no such run to resume; drop --resume to start it")
    if not resume and run_dir.exists():
        raise CaptionerError(
            f"{run_dir}: a run of this name exists; add --resume to continue "
            "it, or choose another --name"
        )


def _open_run(run_dir: Path, cfg: Config, resume: bool, paths: dict[str, Path]) -> dict:
    """Create a new run (state.json last), or check and reopen one for --resume."""
    state_path = run_dir / "state.json"
    if resume and state_path.is_file():
        _check_resumable(run_dir, cfg, paths)
        state = _extend(run_dir, read_json(state_path), cfg)
        saved = read_json(run_dir / "config.json")
        saved["train"].update(epochs=cfg.train.epochs, patience=cfg.train.patience)
        write_json(run_dir / "config.json", saved)
        _publish(run_dir, state, copy_best=True)  # finish what a kill may have interrupted
        return state
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "versions.json", {**library_versions(), "git_commit": git_commit()})
    write_json(run_dir / "vocab.json", read_json(paths["vocab"]))
    write_json(run_dir / "features_meta.json", read_json(Path(paths["features"]) / "meta.json"))
    run_data.pin(run_dir, cfg)  # data.json: evaluate refuses captions the run did not train on
    state = _initial_state(cfg)
    _publish(run_dir, state, copy_best=False)  # state.json and an empty history.csv
    log(f"run directory {run_dir}")
    return state


def _extend(run_dir: Path, state: dict, cfg: Config) -> dict:
    """The run's state under this command's train.epochs and train.patience: a resume may
    raise them to train a finished run further (never below the epochs already done)."""
    epochs, patience = cfg.train.epochs, cfg.train.patience
    if epochs < state["epoch"]:
        raise CaptionerError(
            f"{run_dir}: {state['epoch']} epochs are done; train.epochs={epochs} is fewer"
        )
    if epochs != state["epochs"]:
        log(f"{run_dir}: train.epochs {state['epochs']} -> {epochs}")
    stopped = _stopped_early(state, patience)
    return {**state, "epochs": epochs, "finished": stopped or state["epoch"] >= epochs}


def _stopped_early(state: dict, patience: int) -> bool:
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
    saved, now = _flatten(read_json(run_dir / "config.json")), _flatten(cfg.to_dict())
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


class RunCheckpoint(keras.callbacks.Callback):
    """After each epoch: checkpoint, history, best model and early stopping, via state.json."""

    def __init__(
        self, run_dir: Path, state: dict, patience: int, lr_decay: float = 1.0, write: bool = True
    ):
        super().__init__()
        self.run_dir, self.state, self.patience, self.write = run_dir, state, patience, write
        self.lr_decay = lr_decay  # learning rate factor after an epoch without a better val_loss

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs, state = logs or {}, self.state
        loss, val_loss = float(logs["loss"]), float(logs["val_loss"])
        if not (math.isfinite(loss) and math.isfinite(val_loss)):  # before anything is saved
            raise CaptionerError(
                f"{self.run_dir}: training diverged in epoch {epoch + 1} (loss {loss}, val_loss "
                f"{val_loss}); likely train.learning_rate is too high, or the features are huge "
                "(try model.normalize_features=true); the run keeps its "
                f"{state['epoch']} good epochs, start a new one with another --name"
            )
        improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
        optimizer = getattr(self.model, "optimizer", None)  # None: a model never compiled
        learning_rate = None
        if optimizer is not None:  # a plain or (under tf.distribute) mirrored variable
            learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if not improved and self.lr_decay < 1 and learning_rate is not None:
            # before the checkpoint is saved, so a resume goes on at the new rate
            optimizer.learning_rate = learning_rate * self.lr_decay
            log(
                f"val_loss did not improve: learning rate {learning_rate:.3g} -> "
                f"{learning_rate * self.lr_decay:.3g}"
            )
        state["epoch"] = epoch + 1
        state["history"].append(
            {"epoch": epoch + 1, "loss": loss, "val_loss": val_loss, "learning_rate": learning_rate}
        )
        state["checkpoint"] = f"checkpoints/epoch-{epoch + 1:04d}.keras"
        if self.write:
            _save_atomic(self.model, self.run_dir / state["checkpoint"])
        if improved:
            state.update(
                best_val_loss=val_loss,
                best_epoch=epoch + 1,
                wait=0,
                best_checkpoint=state["checkpoint"],
            )
        else:
            state["wait"] += 1
        stop = _stopped_early(state, self.patience)
        state["finished"] = stop or state["epoch"] >= state["epochs"]
        if self.write:
            _publish(self.run_dir, state, copy_best=improved)
        if stop and not state["epoch"] >= state["epochs"]:
            log(f"early stopping: val_loss has not improved for {state['wait']} epochs")
            self.model.stop_training = True


def _save_atomic(merge_model: keras.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.keras")
    merge_model.save(partial)  # includes the optimizer state, so a resume continues Adam
    os.replace(partial, path)


def _publish(run_dir: Path, state: dict, copy_best: bool) -> None:
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
