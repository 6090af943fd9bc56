"""What each setting may be: the range of every number, the choices of every word setting
(LIMITS), and which settings must be plain folder names. config.py applies them whenever a
Config is built; README "Safety" lists them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from captioner.errors import ConfigError


# --- allowed values -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Finite numbers from low to high; an open end excludes the bound itself."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


COUNT = 10**9  # a generous ceiling for counts and sizes: far above any real use
# Every number and every enumerated string a Config holds: its Range or its choices.
# check_limits refuses anything else with one line naming the key and what is allowed.
LIMITS: dict[str, Range | tuple[str, ...]] = {
    "seed": Range(0, 2**32 - 1),  # NumPy seeds are unsigned 32-bit
    "data.split": ("official", "karpathy", "random"),
    "data.dev_fraction": Range(0, 1, open_high=True),
    "data.test_fraction": Range(0, 1, open_high=True),
    "data.format": ("auto", "flickr8k", "kaggle", "flickr30k", "hf", "karpathy", "csv", "coco"),
    "download.retries": Range(0, 100),
    "download.backoff": Range(0, 3600),
    "download.timeout": Range(0, 86400, open_low=True),
    "download.stall_seconds": Range(0, 86400, open_low=True),
    "download.min_speed": Range(0, 1 << 40),  # bytes/s; 0 = never cut a slow transfer
    "download.max_extract_bytes": Range(1, 1 << 60),
    "download.max_extract_ratio": Range(1, 1e9),
    "demo.train_images": Range(1, COUNT),
    "demo.dev_images": Range(1, COUNT),
    "demo.test_images": Range(0, COUNT),
    "demo.image_size": Range(32, 4096),
    "features.batch_size": Range(1, 65536),
    "features.precision": ("auto", "float32", "bfloat16"),
    "features.dtype": ("auto", "float32", "float16"),
    "features.chunk_size": Range(1, COUNT),
    "features.layout": ("auto", "pooled", "grid"),
    "features.grid_size": Range(0, 1024),  # 0 = the encoder's own grid
    "features.image_size": Range(0, 4096),  # 0 = the encoder's own input size; else >= 32
    "tokenizer.min_count": Range(1, COUNT),
    "tokenizer.max_length": Range(0, 1000),  # 0 = no cap
    "tokenizer.length_percentile": Range(0, 100, open_low=True),
    "model.embed_dim": Range(1, 65536),
    "model.units": Range(1, 65536),
    "model.dropout": Range(0, 1, open_high=True),
    "model.decoder": ("merge", "attention"),  # models.DECODERS (tests/test_model.py checks)
    "model.cell": ("lstm", "gru"),
    "model.attention_units": Range(1, 65536),
    "model.doubly_stochastic": Range(0, 1000),  # 0 = off
    "train.epochs": Range(1, 100_000),
    "train.batch_size": Range(1, 1 << 20),
    "train.learning_rate": Range(0, 10, open_low=True),
    "train.patience": Range(0, 100_000),  # 0 = no early stopping
    "train.lr_decay": Range(0, 1, open_low=True),
    "train.label_smoothing": Range(0, 1, open_high=True),
    "train.precision": ("float32", "bfloat16"),
    "train.strategy": ("default", "mirrored", "multiworker"),
    "train.shuffle_buffer": Range(0, COUNT),  # 0 = the whole training set
    "train.dev_scores": Range(0, COUNT),  # 0 = no dev scores in TensorBoard
    "decode.beam": Range(1, 100),
    "decode.length_penalty": Range(0, 10),
    "decode.no_repeat_ngram": Range(0, 100),
    "decode.max_length": Range(0, 1000),  # 0 = the vocabulary's max_length
}


# What each decoder takes (each models/ module's FEATURES; tests/test_grid.py checks they agree),
# known here without importing Keras: features.layout "auto" follows model.decoder.
DECODER_FEATURES = {"merge": "pooled", "attention": "grid"}


def parse_shard(text: str) -> tuple[int, int]:
    """features.shard "I/N" -> (I, N); ConfigError unless 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(
            f"config key 'features.shard' must be I/N with 0 <= I < N (or empty), got {text!r}"
        )
    return int(match[1]), int(match[2])


def check_limits(config: Any) -> None:
    """Each key of LIMITS in its range or choices, and the cross-key rules; else ConfigError."""
    for key, allowed in LIMITS.items():
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(allowed, Range) and value not in allowed:
            raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")
        if isinstance(allowed, tuple) and value not in allowed:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}"
            )
    if config.features.shard:
        parse_shard(config.features.shard)
    if config.model.decoder == "attention" and config.model.cell != "lstm":
        raise ConfigError(
            f"config key 'model.cell' must be lstm for the attention decoder, got "
            f"{config.model.cell!r}"
        )
    if 0 < config.features.image_size < 32:
        raise ConfigError(
            "config key 'features.image_size' must be 0 (the encoder's own) or at least 32, got "
            f"{config.features.image_size}"
        )
    data = config.data
    if data.dev_fraction + data.test_fraction >= 1:
        raise ConfigError(
            "config keys 'data.dev_fraction' + 'data.test_fraction' must be below 1, got "
            f"{data.dev_fraction} + {data.test_fraction}"
        )


# --- names that become folder names ----------------------------------------------------------
# Each of these settings is one path component under data/ or runs/: a value such as "../x",
# "/abs" or "a/b" would put files outside those folders. "" is allowed where a default exists.
PLAIN_NAMES = {"data.dataset": False, "features.encoder": False, "train.name": True}  # key: "" ok
PLAIN_NAME = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]*")  # one folder name, not hidden


def check_plain_names(config: Any) -> None:
    """Refuse a dataset, encoder or run name that is not a plain file name (no path)."""
    for dotted, empty_ok in PLAIN_NAMES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if (value == "" and empty_ok) or PLAIN_NAME.fullmatch(value):
            continue
        raise ConfigError(
            f"config key '{dotted}' must be a plain name (one folder name: no '/' or '\\', "
            f"not starting with '.'), got {value!r}"
        )
