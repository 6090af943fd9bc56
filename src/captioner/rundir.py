"""A run directory: create it, reopen it for --resume, commit each epoch, load it for inference.

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

Reading and listing runs without TensorFlow is runs.py's job; this module imports TensorFlow
only inside `load_run`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
from captioner.limits import LIMITS
from captioner.runs import is_finished
from captioner.tokenizer import Vocabulary

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
# What inference needs from a run directory.
INFERENCE_FILES = ("config.json", "vocab.json", "features_meta.json", "model.keras")


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


# --- inference: load once ------------------------------------------------------------------------
def read_config(run_dir: str | Path) -> Config:
    """The run's resolved settings (config.json), checked like any other configuration."""
    return from_dict(read_json(Path(run_dir) / "config.json"))


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded, resolved once from a run's config plus flags and passed down
    to decode.decode; its dict is what metrics files record as "decoding"."""

    beam: int  # 1 = greedy (unless n-grams are blocked)
    length_penalty: float
    no_repeat_ngram: int
    max_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def decode_settings(self, beam: int | None = None) -> DecodeSettings:
        """The run's decoding settings (config.json), with `beam` (a --beam flag) when given."""
        decode_cfg = self.cfg.decode
        beam = decode_cfg.beam if beam is None else beam
        if beam not in LIMITS["decode.beam"]:  # the same range as the config key
            raise CaptionerError(f"--beam must be {LIMITS['decode.beam']} (1 = greedy), got {beam}")
        return DecodeSettings(
            beam=beam,
            length_penalty=decode_cfg.length_penalty,
            no_repeat_ngram=decode_cfg.no_repeat_ngram,
            max_length=decode_cfg.max_length or self.vocab.max_length,
        )

    def caption_features(
        self, features: np.ndarray, decoding: DecodeSettings | None = None
    ) -> list[str]:
        """Captions for features of this run's encoder, rows as its cache or encoder gives them
        ((N, D) or (N, H, W, C): feature_cache.for_decoder shapes them for the run's decoder);
        `decoding` defaults to the run's own settings (decode_settings())."""
        return [self.vocab.decode(words) for words in self.decode_features(features, decoding)]

    def decode_features(
        self, features: np.ndarray, decoding: DecodeSettings | None = None, attention=False
    ) -> Any:
        """decode.decode on such features: N lists of word ids, or with `attention` (ids, maps)
        (maps None for a decoder without attention; decode.py says their shape)."""
        from captioner import decode
        from captioner.feature_cache import for_decoder
        from captioner.models import features_of

        if len(features) == 0:
            return ([], []) if attention else []
        decoder = self.cfg.model.decoder
        features = for_decoder(features, features_of(decoder), decoder)
        settings = decoding or self.decode_settings()
        return decode.decode(self.model, features, **settings.to_dict(), attention=attention)

    def caption_files(
        self, paths: Sequence[str | Path], decoding: DecodeSettings | None = None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """([(path, caption)] for readable images, [(path, reason)] for the others)."""
        features, ok_paths, failures = self.encode_files(paths)
        captions = self.caption_features(features, decoding)
        return list(zip(ok_paths, captions, strict=True)), failures

    def encode_files(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, list, list]:
        """(features of the readable images, from the run's encoder; their paths; [(path,
        reason)] for the others)."""
        if self.encoder is None:
            raise CaptionerError(f"{self.run_dir}: loaded without its encoder; use load_run()")
        if not paths:
            return np.zeros((0, 0), np.float32), [], []
        features, ok_paths, failures = self.encoder.encode_files(
            [str(p) for p in paths], batch_size=self.cfg.features.batch_size
        )
        return features, ok_paths, list(failures)


def load_run(
    run_dir: str | Path, with_encoder: bool = True, precision: str | None = None
) -> LoadedRun:
    """Load a run directory. Runs made with the same encoder share one copy of it (the encoder
    cache of encoders.build_encoder). precision: the encoder's, instead of the one that made the
    run's features (export: float32 for TFLite)."""
    run_dir = Path(run_dir)
    for name in INFERENCE_FILES:
        if not (run_dir / name).is_file():
            raise CaptionerError(
                f"{run_dir}: no {name}, not a finished training run; train "
                "one with `captioner train` or pass another --model/--run"
            )
    from captioner.models import decoder_for, load_saved  # registers the models' Keras classes

    state_path = run_dir / "state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    if not state.get("finished"):
        log(
            f"{run_dir}: training not finished ({state.get('epoch', '?')}/"
            f"{state.get('epochs', '?')} epochs); using its best model so far"
        )
    cfg = read_config(run_dir)
    vocab = Vocabulary.load(run_dir / "vocab.json")
    model = load_saved(run_dir / "model.keras", "copy the run again, or train it again")
    predicted = decoder_for(model).vocab_size
    if predicted != vocab.size:
        raise CaptionerError(
            f"{run_dir}: model.keras predicts {predicted}"
            f" words but vocab.json has {vocab.size}; the run is inconsistent"
        )
    meta = read_json(run_dir / "features_meta.json")
    run = LoadedRun(run_dir, cfg, vocab, model, meta)
    if with_encoder:
        run.encoder = _run_encoder(meta, run_dir, precision)
    return run


def _run_encoder(meta: dict, run_dir: Path, precision: str | None = None):
    """The encoder that made the run's features: same network, weights, seed, precision (unless
    `precision` says another), and the same layout (a grid of the same size, from images of the
    same size)."""
    from captioner.encoders import build_encoder
    from captioner.feature_cache import layout_of

    try:
        name, weights = meta["encoder"], meta["weights"]
    except KeyError as error:
        raise CaptionerError(
            f"{run_dir / 'features_meta.json'}: no {error} entry; "
            "retrain with the current captioner"
        ) from None
    layout, grid = layout_of(meta)  # the cache's grid: as computed, or pooled to it
    size = {"grid_size": grid[0] if grid else 0, "image_size": (meta.get("input_size") or [0])[0]}
    return build_encoder(
        name,
        weights,
        precision or meta.get("precision", "auto"),
        meta.get("seed") or 0,
        layout=layout,
        **size,
    )
