"""What a training run records as it trains, besides its checkpoints (train.py):

    runs/<name>/logs/train/        epoch_loss, epoch_learning_rate     (keras.callbacks.TensorBoard)
    runs/<name>/logs/validation/   epoch_loss (TensorBoard); epoch_bleu4, epoch_cider_d: greedy
                                   captions of the first train.dev_scores dev images scored
                                   against their references; dev_captions: a few of them as text
    runs/<name>/training.json      {"seconds", "epochs_timed", "machine"}: the model card's time

`tensorboard --logdir runs` shows every run side by side. tensorboard is a dependency of its own:
TensorFlow 2.21 no longer installs it, and tf.summary.scalar/text need it to write events.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from captioner import captions, metrics
from captioner.config import Config
from captioner.io import log, read_json, write_json
from captioner.models import decoder_for, features_of
from captioner.text import END_ID, START_ID
from captioner.tokenizer import Vocabulary

LOG_DIR = "logs"
TIMING_FILE = "training.json"
SHOWN = 3  # dev images whose captions are shown as text after every epoch
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # what decides CPU speed here


def callbacks(run_dir: Path, cfg: Config, cache: Any, vocab: Vocabulary) -> list:
    """TensorBoard logs, dev scores and captions and the training clock, for `model.fit` (or
    distribute.fit_multiworker's loop, which calls the same hooks)."""
    clock = TrainingClock(Path(run_dir) / TIMING_FILE)
    if importlib.util.find_spec("tensorboard") is None:  # an environment installed before it
        log("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return [clock]
    log_dir = Path(run_dir) / LOG_DIR
    images, features, references = dev_samples(cfg, cache, max(cfg.train.dev_scores, SHOWN))
    return [
        keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0),
        DevScores(
            log_dir / "validation", images, features, references, vocab, cfg.train.dev_scores
        ),
        clock,
    ]


def dev_samples(
    cfg: Config, cache: Any, count: int
) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """The first `count` dev images with features: names, features in the shape the run's
    decoder takes ((N, D) or (N, H, W, C)), references."""
    frame = captions.read_split(cfg, "dev")
    frame = frame[frame["image"].isin(set(cache.row))]  # images with features
    first = frame["image"].unique()[:count]
    references = captions.references(frame[frame["image"].isin(first)])
    images = list(references)
    rows = [cache.row[image] for image in images]
    features = cache.rows(rows, features_of(cfg.model.decoder), cfg.model.decoder)
    return images, features, [references[image] for image in images]


def greedy_captions(model: keras.Model, features: np.ndarray, vocab: Vocabulary) -> list[str]:
    """Greedy captions with the model's current weights, step by step in eager mode: a few ms
    per step for hundreds of images at once, and no tracing (decode.py's compiled loop would
    trace again for every run)."""
    with warnings.catch_warnings():
        # The embedding's mask reaches the LSTM cell, which warns it drops it: one token has none.
        warnings.filterwarnings("ignore", "Layer '.*_cell'.*does not support masking")
        decoder = decoder_for(model)
        state = decoder.start(features)
        tokens = np.full(len(features), START_ID, np.int32)
        words = []
        for _ in range(vocab.max_length):
            hidden, state, _ = decoder.step(tokens, state)  # (B, U)
            logits = keras.ops.convert_to_numpy(decoder.logits(hidden))  # (B, V)
            logits[:, :END_ID] = -np.inf  # never <pad>, <unk> or <start>
            tokens = logits.argmax(axis=1).astype(np.int32)
            words.append(tokens)
    ids = np.stack(words, axis=1) if words else np.zeros((len(features), 0), np.int32)
    return [vocab.decode(row.tolist()) for row in ids]  # decode stops at <end>


class DevScores(keras.callbacks.Callback):
    """After each epoch: greedy captions of the sample dev images, their BLEU-4 and CIDEr-D
    against the references (epoch_bleu4, epoch_cider_d, beside Keras' epoch_loss in the
    validation logs) and the first SHOWN of them as a text table. Scores use the first
    `scored` images (0: none)."""

    def __init__(self, log_dir, images, features, references, vocab: Vocabulary, scored: int):
        super().__init__()
        self.log_dir, self.images, self.features = Path(log_dir), images, features
        self.references, self.vocab, self.scored = references, vocab, scored
        self._writer = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.images:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        try:
            generated = greedy_captions(self.model, self.features, self.vocab)
        except Exception as error:  # a model without a decoder's step: never stop training
            log(f"dev captions for TensorBoard skipped: {type(error).__name__}: {error}")
            self.images = []
            return
        rows = ["| image | greedy caption | a reference |", "|---|---|---|"]
        rows += [
            f"| {image} | {caption} | {refs[0]} |"
            for image, caption, refs in list(
                zip(self.images, generated, self.references, strict=True)
            )[:SHOWN]
        ]
        with self._writer.as_default():
            if self.scored:
                hypotheses, references = generated[: self.scored], self.references[: self.scored]
                bleu4 = metrics.bleu(hypotheses, references)["bleu4"]
                tf.summary.scalar("epoch_bleu4", bleu4, step=epoch)
                tf.summary.scalar("epoch_cider_d", metrics.cider_d(hypotheses, references), epoch)
            tf.summary.text("dev_captions", "\n".join(rows), step=epoch)
        self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TrainingClock(keras.callbacks.Callback):
    """Adds each epoch's seconds to training.json (a resumed run keeps counting), with the
    machine that trained it."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        record = {"seconds": 0.0, "epochs_timed": 0}
        if self.path.is_file():
            record.update(read_json(self.path))
        record["seconds"] = round(record["seconds"] + time.perf_counter() - self._start, 3)
        record["epochs_timed"] += 1
        record["machine"] = machine()
        write_json(self.path, record)


def machine() -> dict[str, Any]:
    """CPU model, cores, the CPU features that decide speed here, and any GPUs."""
    import tensorflow as tf

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass  # not Linux: the platform's processor name only
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
        "platform": platform.platform(),
    }
