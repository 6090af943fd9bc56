"""A finished run loaded for inference: its model, vocabulary, decoding settings and the encoder
that made its features, so new images are captioned exactly as its training features were made.
rundir.py writes run directories; this module only reads them, and imports TensorFlow only
inside `load_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import log, read_json
from captioner.limits import LIMITS
from captioner.rundir import read_config
from captioner.tokenizer import Vocabulary

# What inference needs from a run directory.
INFERENCE_FILES = ("config.json", "vocab.json", "features_meta.json", "model.keras")


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
