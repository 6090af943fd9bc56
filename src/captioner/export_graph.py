"""A trained run's whole caption path as TensorFlow graph functions, for export (and serving).

    image_bytes (B,) tf.string: the bytes of JPEG, PNG, GIF or BMP files     (SavedModel only)
    -> decoded to RGB: JPEG with libjpeg's accurate integer DCT, as Pillow  (H, W, 3) uint8 each
    -> resized to the encoder's S x S by Pillow's nearest-neighbour rule    (B, S, S, 3) uint8
       (together: pixel-identical to images.load_image, Pillow, which made the training
       features: alpha dropped, greyscale and palette expanded, 16-bit scaled to 8, no EXIF
       rotation; tests/test_export.py checks it)
    pixels (B, S, S, 3) uint8 RGB, so resized                               (the TFLite input)
    -> Encoder.forward: the encoder's preprocess_input and network          (B, D) float32,
       pooled, or (B, H, W, C) grid, as the run's features were made (its layout, grid and
       features.image_size S)
    -> in the shape the decoder takes (feature_cache.for_decoder: a pooled   (B, D) or
       decoder on a grid takes its mean over the regions)                    (B, H, W, C)
    -> decode_loops.decode_tokens: greedy or beam search, Decoder interface (B, T) word ids
    -> the vocabulary, a string constant                                    (B, T) words
    -> joined by spaces                                                     (B,) captions

The SavedModel runs all of it. A TFLite model starts at the resized pixels and ends at the
words: image decoding and string joining exist only as TensorFlow ("Select TF") ops, which no
Python TFLite runtime can run since TensorFlow 2.20 (neither tf.lite nor ai-edge-litert ships
the Flex delegate), and Pillow's resizing rule needs float64 sums, which TFLite lacks; so the
TFLite model uses TFLite's own ops only. The decoding loop runs uncompiled (compiled=False): TF
Serving turns XLA off by default and TFLite has none. Any decoder works whose start and step
are graph ops (models/decoder.py).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from captioner import decode_loops
from captioner.likelihood import feature_shape
from captioner.limits import LIMITS
from captioner.loaded_run import DecodeSettings
from captioner.models import decoder_for, features_of
from captioner.signature import (
    BEAM_INPUT,
    BEAM_SIGNATURE,
    CAPTION,
    FEATURE_INPUT,
    IMAGE_INPUT,
    LOG_PROB,
    SIGNATURE,
)
from captioner.text import END_ID, PAD_ID

PIXEL_INPUT, WORDS = "pixels", "words"  # TFLite's input and caption output
MAX_BEAM = int(LIMITS["decode.beam"].high)  # the widest beam the beam input accepts


def decode_image_bytes(data: tf.Tensor) -> tf.Tensor:
    """One image file's bytes (scalar tf.string) -> (H, W, 3) uint8 RGB, as Pillow decodes it.

    JPEG goes through decode_jpeg with the accurate DCT (decode_image would use the fast one, a
    few levels off Pillow's pixels); other formats through decode_image (first frame of a GIF).
    An undecodable file fails the whole call with InvalidArgumentError."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 exactly as Pillow's resize with NEAREST.

    Pillow (ImagingScaleAffine) starts half a step in and adds the step, H / size in float64,
    once per output pixel, truncating: at sizes divisible by 64 the sum lands just below whole
    numbers that floor((x + 0.5) * H / size) reaches, so TensorFlow's own nearest-neighbour
    resize takes other pixels there. A cumulative float64 sum repeats Pillow's additions."""
    return tf.gather(
        tf.gather(image, _pillow_nearest(tf.shape(image)[0], size), axis=0),
        _pillow_nearest(tf.shape(image)[1], size),
        axis=1,
    )


def _pillow_nearest(length: tf.Tensor, size: int) -> tf.Tensor:
    """(size,) int32: the source pixel of each output pixel along an axis of `length` pixels."""
    # divide_no_nan: a plain division by a constant becomes a product with its reciprocal in a
    # graph (2.8571428571428568 for 640 / 224, not 2.857142857142857), which moves boundaries
    step = tf.math.divide_no_nan(tf.cast(length, tf.float64), tf.constant(size, tf.float64))
    positions = tf.cumsum(tf.concat([[step / 2], tf.fill([size - 1], step)], axis=0))
    return tf.cast(positions, tf.int32)  # truncation, as Pillow's COORD for positive values


class CaptionGraph:
    """The graph functions of one run: its encoder, decoder, vocabulary and decoding settings.

    encoder: encoders.Encoder, or None for the decoder alone, which takes features in the
    shape the model takes (likelihood.feature_shape: (D,) for merge) instead of images; model:
    the run's keras.Model (any decoder); words: the vocabulary tokens by id. export.py writes
    `saved_model_signatures()` or `tflite_signatures()`."""

    def __init__(
        self, encoder: Any, model: Any, words: tuple[str, ...], settings: DecodeSettings
    ) -> None:
        self.encoder, self.model, self.settings = encoder, model, settings
        self.decoder = decoder_for(model)
        self.feature_shape = feature_shape(model)
        # a pooled decoder on a grid encoder takes the mean over the regions (for_decoder)
        self.pool = (
            encoder is not None
            and encoder.layout == "grid"
            and features_of(self.decoder.name) == "pooled"
        )
        self.words = ("",) * (END_ID + 1) + tuple(words[END_ID + 1 :])  # specials print as ""

    def saved_model_signatures(self) -> dict[str, Any]:
        """{name: tf.function}: image_bytes (or features) [-> beam] -> caption, log_prob."""
        return self._signatures(
            lambda: tf.TensorSpec([None], tf.string, name=IMAGE_INPUT), self.captions
        )

    def tflite_signatures(self) -> dict[str, Any]:
        """{name: tf.function}: pixels (or features) [-> beam] -> words, log_prob."""
        return self._signatures(
            lambda: tf.TensorSpec(
                [None, self.encoder.size, self.encoder.size, 3], tf.uint8, name=PIXEL_INPUT
            ),
            self.caption_words,
        )

    def _signatures(self, image_spec: Any, call: Any) -> dict[str, Any]:
        """The two signatures (signature.py) of call(inputs[, beam]) on inputs of image_spec(),
        or without an encoder on features (B, *feature_shape) float32; each input is named
        after its spec."""
        inputs = (
            image_spec()
            if self.encoder is not None
            else tf.TensorSpec([None, *self.feature_shape], tf.float32, name=FEATURE_INPUT)
        )
        beam = tf.TensorSpec([], tf.int32, name=BEAM_INPUT)
        return {
            SIGNATURE: tf.function(lambda inputs: call(inputs), [inputs]),
            BEAM_SIGNATURE: tf.function(call, [inputs, beam]),
        }

    def captions(self, inputs: tf.Tensor, beam: tf.Tensor | None = None) -> dict:
        """inputs: image_bytes (B,) tf.string (without an encoder: features), beam an int32
        scalar 1..MAX_BEAM (None: the settings') -> {"caption": (B,) tf.string, "log_prob":
        (B,) float32}."""
        if self.encoder is not None:
            size = self.encoder.size
            inputs = tf.map_fn(
                lambda data: resize(decode_image_bytes(data), size),
                inputs,
                fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8),
            )  # (B, S, S, 3)
        words, log_probabilities = self._words(inputs, beam)
        # " ".join of the non-empty words: they form a prefix of each row
        spaced = tf.where(words == "", words, " " + words)
        captions = tf.strings.strip(tf.strings.reduce_join(spaced, axis=1))
        return {CAPTION: captions, LOG_PROB: log_probabilities}

    def caption_words(self, inputs: tf.Tensor, beam: tf.Tensor | None = None) -> dict:
        """inputs: pixels (B, S, S, 3) uint8 RGB (images.load_image's; without an encoder:
        features), beam as in `captions` -> {"words": (B, T) tf.string, the caption's words
        then "", "log_prob": (B,)}."""
        words, log_probabilities = self._words(inputs, beam)
        return {WORDS: words, LOG_PROB: log_probabilities}

    def _words(self, inputs: tf.Tensor, beam: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """(B, S, S, 3) uint8 pixels (without an encoder: features) -> (words (B, T) tf.string,
        log-probabilities (B,) under the model): the words before the first <end>, as
        Vocabulary.decode, then ""."""
        features = inputs
        if self.encoder is not None:
            features = self.encoder.forward(inputs)  # (B, D) or (B, H, W, C) float32
        if self.pool:
            features = tf.reduce_mean(features, axis=[1, 2])  # (B, C)
        if beam is None:
            beam = self.settings.beam
        else:
            tf.debugging.assert_greater_equal(beam, 1, message="beam must be at least 1")
            tf.debugging.assert_less_equal(beam, MAX_BEAM, message=f"beam must be <= {MAX_BEAM}")
            beam = tf.clip_by_value(beam, 1, MAX_BEAM)  # TFLite drops the asserts
        ids, log_probabilities = decode_loops.decode_tokens(
            self.decoder,
            features,
            self.settings.max_length,
            beam,
            self.settings.length_penalty,
            self.settings.no_repeat_ngram,
            compiled=False,
        )  # (B, T), (B,)
        before_end = tf.cumsum(tf.cast(ids == END_ID, tf.int32), axis=1, exclusive=True) == 0
        ids = tf.where(before_end, ids, PAD_ID)  # <pad>, <start>, <unk> are never emitted
        return tf.gather(tf.constant(self.words), ids), log_probabilities
