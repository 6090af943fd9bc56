"""The decoder seam: what training, decoding, evaluation and the app know of a caption model.

A decoder is chosen by `model.decoder` in the config (DECODERS lists them: "merge", the
notebook's model on one pooled vector per image, and "attention", Show-Attend-Tell's soft
attention over a grid of regions) and saved runs record it. Everything outside captioner/models/
goes through these functions and the `Decoder` interface; layer names and model internals stay
inside each decoder's own module.

Shapes: B images (or hypotheses), T caption positions, U hidden size, V words, L = H * W regions.

Each decoder module declares the image features it takes, `FEATURES = "pooled"` ((B, D): one
vector per image) or `"grid"` ((B, H, W, C): a vector per image region); features_of(name) asks
it, and feature_cache.for_decoder gives every consumer the rows in that shape (a grid cache
serves a pooled decoder as the mean over regions; D = C then).

    build(cfg, feature_meta, vocab_size, mean, variance) -> keras.Model, compiled for `fit`:
        {"features": (B, D) or (B, H, W, C) float32, "tokens": (B, T) int32} -> logits (B, T, V);
        its train_step/test_step (the training step) take ({"features", "tokens"}, targets
        (B, T)) and return {"loss"}: cross-entropy averaged over the non-padding targets (what
        training minimises may add a decoder's regulariser; "loss" is the cross-entropy alone).
    load_saved(path, fix) -> keras.Model, any decoder's (safe mode).
    decoder_for(model) -> Decoder, for inference with a built or loaded model:
        start(features) -> state = (image, carry): two tuples of tensors, each (B, ...); the
            image's parts never change between steps, the carry (the RNN state) does
        step(token_ids (R,) int32, state) -> (hidden (R, U), new state, attention (R, L) | None)
            R = B * K: the carry may hold K rows per image (rows b*K ... b*K + K-1 are image
            b's), the image's parts one; the step shares an image's parts among its rows
        step_fn() -> the same step, prepared for a compiled decoding loop (call while tracing)
        output_layer() -> (kernel (U, V), bias (V,)): logits = hidden @ kernel + bias
        logits(hidden (B, U)) -> (B, V) float32
        vocab_size, hidden_size: V and U; regions: L, or None for a decoder without attention
    Beam search repeats the carry per beam and reorders it by the chosen hypotheses each step;
    the image's parts stay one row per image (read once for all of its beams).
    attention[b] is the map of the word chosen from hidden[b]: weights over the L regions in
    row-major (H, W) order, summing to 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np

from captioner.config import Config, ModelConfig
from captioner.errors import CaptionerError
from captioner.models import attention, merge

DEFAULT_DECODER = ModelConfig.decoder  # runs saved before model.decoder existed are merge runs
# model.decoder -> (module building it, its keras.Model class, its Decoder)
DECODERS = {
    "merge": (merge, merge.MergeModel, merge.MergeDecoder),
    "attention": (attention, attention.AttentionModel, attention.AttentionDecoder),
}


class Decoder(Protocol):
    """One decoder's inference side; see the module docstring for shapes."""

    name: str
    vocab_size: int
    hidden_size: int
    regions: int | None

    def start(self, features) -> tuple: ...

    def step(self, token_ids, state) -> tuple: ...

    def step_fn(self) -> Any: ...

    def output_layer(self) -> tuple: ...

    def logits(self, hidden) -> Any: ...


def features_of(decoder: str) -> str:
    """What decoder `decoder` (a model.decoder name) takes: "pooled" or "grid" (its FEATURES)."""
    if decoder not in DECODERS:
        raise CaptionerError(
            f"model.decoder: unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}"
        )
    return DECODERS[decoder][0].FEATURES


def build(
    cfg: Config,
    feature_meta: dict[str, Any],
    vocab_size: int,
    feature_mean: np.ndarray | None = None,
    feature_variance: np.ndarray | None = None,
) -> keras.Model:
    """The decoder cfg.model.decoder names, for features of `feature_meta` (its "dim", and its
    "grid" [H, W] for a grid decoder), compiled with Adam at cfg.train.learning_rate."""
    module = DECODERS[cfg.model.decoder][0]  # a known name: config checks model.decoder
    model = module.build_model(
        feature_shape(cfg.model.decoder, feature_meta),
        vocab_size,
        cfg.model,
        feature_mean,
        feature_variance,
        precision=cfg.train.precision,
    )
    module.compile_model(model, cfg.train.learning_rate)
    return model


def feature_shape(decoder: str, feature_meta: dict[str, Any]) -> Any:
    """What decoder `decoder` builds its features input from: D for a pooled decoder, (H, W, C)
    for a grid decoder (which needs a grid cache: one line if feature_meta has no "grid")."""
    if features_of(decoder) == "pooled":
        return int(feature_meta["dim"])
    grid = feature_meta.get("grid")
    if not grid:
        raise CaptionerError(
            f"decoder {decoder} needs a grid cache: run `captioner features --grid`"
        )
    return (int(grid[0]), int(grid[1]), int(feature_meta["dim"]))


def decoder_for(model: keras.Model) -> Decoder:
    """The inference interface of a built or loaded model, whichever decoder it is."""
    for _, model_class, decoder_class in DECODERS.values():
        if isinstance(model, model_class):
            return decoder_class(model)
    raise CaptionerError(
        f"model '{model.name}' ({type(model).__name__}) is none of the decoders "
        f"{', '.join(DECODERS)}; train it again with the current captioner"
    )


def load_saved(path: Path, fix: str) -> keras.Model:
    """A saved .keras model (safe mode); a missing, truncated or foreign file is one line.
    Importing this module registered every decoder's Keras classes (package "captioner")."""
    import zipfile

    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise CaptionerError(
            f"{path}: unreadable or corrupt (not a complete .keras archive: truncated by an "
            f"interrupted copy or download?); {fix}"
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged or foreign file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CaptionerError(f"{path}: unreadable or corrupt ({reason}); {fix}") from None
