"""The train stage: fit the caption model (model.decoder) on cached features, resumably.

The run directory (its files, state.json as the commit point, --resume) is rundir.py's; this
module decides what happens after each epoch (RunCheckpoint: best model, early stopping, learning
rate decay) and asks rundir.py to commit it. Every input is read and checked before the run
directory is made, and an epoch with a NaN or infinite loss stops training before it is
committed: a run is never "finished" on NaN.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import captions, data, distribute, models, monitor, pipeline, rundir
from captioner.card import write_card
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import log, set_seed
from captioner.tokenizer import Vocabulary


def train(cfg: Config, resume: bool = False) -> Path:
    """Train in runs/<name>/ (running any missing earlier stage first); return the run dir."""
    if cfg.train.strategy == "multiworker" and not cfg.train.name:
        raise CaptionerError("--strategy multiworker needs --name, the same on every worker")
    chief = distribute.is_chief(cfg.train.strategy)
    run_dir = rundir.locate(cfg, resume)
    if chief:  # before any long work: a finished run is never overwritten
        rundir.check_can_start(run_dir, resume)
    # the strategy before other TF work: a multi-worker strategy must configure the runtime
    strategy = distribute.make_strategy(cfg.train.strategy)
    set_seed(cfg.seed)
    paths = pipeline.prepare(cfg)
    from captioner.feature_cache import load_cache

    cache = load_cache(paths["features"])
    cache.check_takes(models.features_of(cfg.model.decoder), cfg.model.decoder)
    # Every input is read and checked before the run directory is made (a resumed run's
    # vocabulary is checked equal to paths["vocab"]), so a refused start leaves nothing behind.
    vocab = Vocabulary.load(paths["vocab"])
    train_data, dev_data, train_rows = _datasets(cfg, vocab, cache)
    if chief:
        state = rundir.open_run(run_dir, cfg, resume, paths)
    elif resume:  # other workers read the chief's run but write nothing
        state = rundir.extend(run_dir, rundir.read_state(run_dir), cfg)
    else:
        state = rundir.initial_state(cfg)
    if state["finished"]:
        log(
            f"{run_dir}: already finished ({state['epoch']} epochs); --resume with more "
            "--epochs (or a larger train.patience after early stopping) trains it further"
        )
        return run_dir

    log(
        f"vocabulary {vocab.size:,}, features {cache.describe()}, "
        f"{strategy.num_replicas_in_sync} replica(s); {state['epoch']}/{cfg.train.epochs} "
        "epochs done"
    )
    with strategy.scope():
        if state["checkpoint"]:  # resume: weights, optimizer state and its step count
            caption_model = models.load_saved(run_dir / state["checkpoint"], "start a new run")
        else:
            caption_model = _new_model(cfg, cache, train_rows, vocab.size)
    caption_model.label_smoothing = cfg.train.label_smoothing  # read when fit traces its steps
    checkpoint = RunCheckpoint(run_dir, state, cfg.train.patience, cfg.train.lr_decay, write=chief)
    # after the checkpoint each epoch: TensorBoard logs, dev scores, clock (monitor.py)
    callbacks = [checkpoint, *(monitor.callbacks(run_dir, cfg, cache, vocab) if chief else [])]
    if cfg.train.strategy == "multiworker":
        distribute.fit_multiworker(
            strategy,
            caption_model,
            train_data,
            dev_data,
            cfg.train.epochs,
            state["epoch"],
            callbacks,
        )
    else:
        _fit(caption_model, train_data, dev_data, cfg.train.epochs, state["epoch"], callbacks)
    log(f"{run_dir}: best val_loss {state['best_val_loss']:.4f} at epoch {state['best_epoch']}")
    if chief and state["finished"]:
        log(f"model card {write_card(run_dir)}")
    return run_dir


def _fit(
    caption_model: keras.Model,
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
        caption_model.fit(
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
        captions.read_split(cfg, "train"), vocab, cache.row, "train"
    )
    dev_rows, dev_captions = data.encode_split(
        captions.read_split(cfg, "dev"), vocab, cache.row, "dev"
    )
    if not dev_captions:
        raise CaptionerError(
            f"{cfg.captions_csv}: no dev captions with features; validation "
            "and early stopping need a dev split (see --split)"
        )
    batch = cfg.train.batch_size  # the global batch: split across replicas by tf.distribute
    shape = {"takes": models.features_of(cfg.model.decoder), "decoder": cfg.model.decoder}
    train_data = data.make_dataset(
        cache.features,
        train_rows,
        train_captions,
        batch,
        shuffle=True,
        seed=cfg.seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
        **shape,
    )
    dev_data = data.make_dataset(  # bucketed: the same loss, less padding to compute
        cache.features,
        dev_rows,
        dev_captions,
        batch,
        shuffle=False,
        seed=cfg.seed,
        bucket=True,
        **shape,
    )
    log(
        f"training on {len(train_captions):,} captions of {len(np.unique(train_rows)):,} "
        f"images, validating on {len(dev_captions):,}"
    )
    return train_data, dev_data, train_rows


def _new_model(cfg: Config, cache: Any, train_rows: np.ndarray, vocab_size: int) -> keras.Model:
    """A compiled model of cfg.model.decoder; feature statistics only when it normalises them."""
    mean = variance = None
    if cfg.model.normalize_features:
        decoder = cfg.model.decoder
        mean, variance = data.feature_stats(
            cache.features, train_rows, takes=models.features_of(decoder), decoder=decoder
        )
    return models.build(cfg, cache.meta, vocab_size, mean, variance)


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
            rundir.save_checkpoint(self.model, self.run_dir, state)
        if improved:
            state.update(
                best_val_loss=val_loss,
                best_epoch=epoch + 1,
                wait=0,
                best_checkpoint=state["checkpoint"],
            )
        else:
            state["wait"] += 1
        stop = rundir.stopped_early(state, self.patience)
        state["finished"] = stop or state["epoch"] >= state["epochs"]
        if self.write:
            rundir.publish(self.run_dir, state, copy_best=improved)
        if stop and not state["epoch"] >= state["epochs"]:
            log(f"early stopping: val_loss has not improved for {state['wait']} epochs")
            self.model.stop_training = True
