"""Configuration: typed defaults in code, a TOML file on top, `--set section.key=value` last.

Every stage receives one frozen `Config`. Unknown keys and wrong types raise `ConfigError`
naming the key, so a typo in a config file never silently falls back to a default; values out of
their range in LIMITS (limits.py) raise it when the Config is built, before any stage creates a
file.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from captioner.encoder_specs import ENCODERS
from captioner.errors import ConfigError
from captioner.limits import (  # noqa: F401  (LIMITS, Range, parse_shard: also read from here)
    DECODER_FEATURES,
    LIMITS,
    PLAIN_NAME,
    Range,
    check_limits,
    check_plain_names,
    parse_shard,
)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "demo"
    data_dir: str = "data"
    # official | karpathy | random. "official" falls back to a seeded random split when the
    # dataset ships no split files.
    split: str = "official"
    dev_fraction: float = 0.1  # used by the random split only
    test_fraction: float = 0.1
    # auto | flickr8k | kaggle | flickr30k | hf | karpathy | csv | coco
    format: str = "auto"
    captions: str = ""  # bring-your-own data: caption file (csv or coco json)
    images: str = ""  # bring-your-own data: image folder


@dataclass(frozen=True)
class DownloadConfig:
    urls: tuple[str, ...] = ()  # empty: the dataset's built-in table (download.DATASETS)
    md5: tuple[str, ...] = ()  # one per url; "" means not verified
    karpathy_url: str = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
    mirror: str = ""
    skip_checksum: bool = False
    retries: int = 4
    backoff: float = 2.0  # seconds before the first retry; doubles after each failure
    timeout: float = 60.0  # seconds for connecting and for each read
    # A transfer slower than min_speed bytes/s over stall_seconds is cut and resumed (a retry).
    stall_seconds: float = 60.0
    min_speed: float = 1024.0
    # Caps on one archive's extraction: total uncompressed bytes and uncompressed/compressed.
    max_extract_bytes: int = 32 * 1024**3
    max_extract_ratio: float = 100.0


@dataclass(frozen=True)
class DemoConfig:
    """Size of the synthetic offline dataset (see demo.py)."""

    train_images: int = 1000
    dev_images: int = 100
    test_images: int = 100
    image_size: int = 128


@dataclass(frozen=True)
class FeaturesConfig:
    encoder: str = "vgg16"
    weights: str = "imagenet"  # imagenet | none | path to a local .h5/.weights.h5 file
    batch_size: int = 16  # images per inference batch (train.batch_size counts captions)
    precision: str = "auto"  # auto | float32 | bfloat16
    dtype: str = "auto"  # stored on disk: float32 | float16 | auto (grids float16, else 32)
    chunk_size: int = 256  # rows written per resumable chunk
    shard: str = ""  # "I/N": compute only shard I of N (see features.merge_shards)
    # What is cached per image: "pooled" one vector, "grid" the last convolutional map (H, W, C)
    # (VGG16: block5_conv3), "auto" what model.decoder takes. Each has its own cache folder.
    layout: str = "auto"
    grid_size: int = 0  # average-pool the grid to grid_size x grid_size (VGG16: 7); 0 = as is
    image_size: int = 0  # encoder input in pixels (square); 0 = the encoder's own (224)


@dataclass(frozen=True)
class TokenizerConfig:
    # Words seen fewer times than this in training become <unk>. The reference approach kept every
    # word (min_count=1); 5 halves the softmax cost and drops mostly typos (see README).
    min_count: int = 5
    max_length: int = 0  # cap on caption length in words; 0 = no cap
    length_percentile: float = 100.0  # cap at this percentile of training caption lengths


@dataclass(frozen=True)
class ModelConfig:
    # Which caption model (captioner/models/): "merge" is the notebook's, on one pooled vector
    # per image; "attention" is Show-Attend-Tell's soft attention over a grid of image regions
    # (docs/ATTENTION.md). Runs saved before this key existed are merge runs, and read as such.
    decoder: str = "merge"
    embed_dim: int = 256
    units: int = 256
    dropout: float = 0.4
    cell: str = "lstm"  # lstm | gru
    # Standardise image features with training-set mean/std inside the model (useful for
    # features with large or uneven scale, e.g. random-weight encoders).
    normalize_features: bool = False
    # The attention decoder only: the width of its attention layer, and the weight lambda of its
    # doubly stochastic regularisation, which asks every region to be attended to about once
    # over a caption (0 = off; docs/ATTENTION.md).
    attention_units: int = 256
    doubly_stochastic: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64  # captions per batch, the global batch (features.batch_size: images)
    learning_rate: float = 1e-3
    patience: int = 3  # early stopping on validation loss; 0 disables
    # After an epoch whose validation loss did not improve, multiply the learning rate by this
    # (1 = constant). Chosen on real Flickr8k dev (README, "Defaults").
    lr_decay: float = 0.5
    # Cross-entropy against (1 - e) one_hot + e / V, in the training and the dev loss. Chosen on
    # real Flickr8k dev (README, "Defaults"): over two seeds, 0.1 gave BLEU-4 .191 against .181
    # and CIDEr-D .452 against .444 (within seed-to-seed noise, never worse on average).
    label_smoothing: float = 0.1
    precision: str = "float32"  # float32 | bfloat16 (mixed)
    runs_dir: str = "runs"
    name: str = ""  # run name; default <dataset>-<encoder>-<timestamp>
    strategy: str = "default"  # default | mirrored | multiworker
    shuffle_buffer: int = 0  # 0 = whole training set
    # Dev images captioned (greedy) after every epoch for TensorBoard's dev BLEU-4 and CIDEr-D
    # (monitor.py); 0 = none. 500 takes about a second per epoch on Flickr8k.
    dev_scores: int = 500


@dataclass(frozen=True)
class DecodeConfig:
    # Chosen on real Flickr8k dev (README, "Defaults"): beam 5 scored higher than 3 on every
    # metric; length**0.7 brought the mean length from 9.4 to 10.2 words (references: 10.9)
    # and CIDEr-D up; blocking repeated trigrams ends the rare "a blue shirt and a blue shirt".
    beam: int = 5  # 1 = greedy
    length_penalty: float = 0.7  # score / length**alpha; 0 = plain log-probability
    no_repeat_ngram: int = 3  # block repeated n-grams of this size; 0 = off
    max_length: int = 0  # 0 = the tokenizer's max_length


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    # --- derived paths (never stored separately, so they cannot disagree) -----------------
    @property
    def dataset_dir(self) -> Path:
        return Path(self.data.data_dir) / self.data.dataset

    @property
    def raw_dir(self) -> Path:
        return self.dataset_dir / "raw"

    @property
    def captions_csv(self) -> Path:
        return self.dataset_dir / "captions.csv"

    @property
    def features_layout(self) -> str:
        """pooled or grid: features.layout, or for "auto" what model.decoder takes."""
        layout = self.features.layout
        return DECODER_FEATURES.get(self.model.decoder, "pooled") if layout == "auto" else layout

    @property
    def features_dir(self) -> Path:
        """features/<encoder>[-<image_size>px][-grid[<n>x<n>]] for a registered encoder (vgg16,
        vgg16-grid, vgg16-grid7x7, vgg16-112px-grid); any other name is a cache's own folder."""
        features, name = self.features, self.features.encoder
        if name in ENCODERS:
            name += f"-{features.image_size}px" if features.image_size else ""
            if self.features_layout == "grid":
                size = features.grid_size
                name += "-grid" + (f"{size}x{size}" if size else "")
        return self.dataset_dir / "features" / name

    @property
    def vocab_json(self) -> Path:
        return self.dataset_dir / "vocab.json"

    def __post_init__(self) -> None:
        check_plain_names(self)
        check_limits(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bundled_config(dataset: str) -> dict[str, Any]:
    """The `configs/<dataset>.toml` shipped with the package, or {} for custom datasets."""
    path = resources.files("captioner") / "configs" / f"{dataset}.toml"
    if not PLAIN_NAME.fullmatch(dataset) or not path.is_file():  # not a name: refused later
        return {}
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation, allowing int for float and list for tuple."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of strings, got {value!r}")
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be {annotation.__name__}, got {value!r}")
    if not isinstance(value, annotation):
        got = f"{type(value).__name__} {value!r}"
        raise ConfigError(f"config key '{key}' must be {annotation.__name__}, got {got}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        annotation, value = hints[f.name], values[f.name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{f.name}' must be a [section]")
            kwargs[f.name] = _build(annotation, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(f"{prefix}{f.name}", value, annotation)
    return cls(**kwargs)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`train.epochs=5` -> {"train": {"epochs": 5}}; values are TOML, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    dotted, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parse_override_value(dotted.strip(), value)


def load_config(
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    dataset: str | None = None,
    **flags: Any,
) -> Config:
    """Resolve a Config: defaults < bundled `configs/<dataset>.toml` (or `path`) < --set < flags.

    `flags` are dotted keys set by CLI options, e.g. {"data.data_dir": "x"}; None values are
    ignored so unset options never override the file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    name = dataset or values.get("data", {}).get("dataset") or DataConfig.dataset
    if path is None:
        values = _bundled_config(name)
    values = _merge(values, {"data": {"dataset": name}})
    for text in overrides:
        values = _merge(values, parse_override(text))
    for dotted, value in flags.items():
        if value is not None:
            values = _merge(values, parse_override_value(dotted, value))
    return _build(Config, values)


def parse_override_value(dotted: str, value: Any) -> dict[str, Any]:
    """("train.epochs", 5) -> {"train": {"epochs": 5}}."""
    result: Any = value
    for part in reversed(dotted.split(".")):
        result = {part: result}
    return result


def replace(config: Config, **dotted: Any) -> Config:
    """A copy of `config` with dotted keys replaced: replace(cfg, **{"train.epochs": 3})."""
    values = config.to_dict()
    for key, value in dotted.items():
        values = _merge(values, parse_override_value(key, value))
    return _build(Config, values)


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a run's config.json)."""
    return _build(Config, values)
