"""The merge model: equivalence with the reference per-prefix model, masking, the fused output
layer + loss, one-step decoding, saving, and bfloat16 mixed precision."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tinydata import fixture_captions

from captioner import models
from captioner.config import ModelConfig
from captioner.errors import CaptionerError
from captioner.models import merge, packed_lstm, shared
from captioner.reference import build_prefix_model, copy_merge_weights
from captioner.text import END_ID, START_ID, normalize
from captioner.tokenizer import Vocabulary

DATA = Path(__file__).parent / "data"
FEATURE_DIM = 64
REFERENCE_SIZES = ModelConfig()  # 256, 256, dropout 0.4
# Tests of mechanics rather than of sizes; no dropout, so training-mode outputs are deterministic.
SMALL = ModelConfig(units=32, embed_dim=16, dropout=0.0)
SMALL_GRU = ModelConfig(units=32, embed_dim=16, dropout=0.0, cell="gru")


@pytest.fixture(scope="module")
def captions(flickr8k_like) -> tuple[Vocabulary, list[list[int]]]:
    """The vocabulary (no min count) and encoded captions of the first 40 training images."""
    names = (flickr8k_like / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text()
    by_image = fixture_captions(flickr8k_like)
    texts = [normalize(raw) for name in names.split()[:40] for raw in by_image[name]]
    vocab = Vocabulary.from_captions(texts, min_count=1)
    return vocab, [vocab.encode(text) for text in texts]


def batch(encoded: list[list[int]], rows: list[int], extra_padding: int = 0, seed: int = 0):
    """({"features", "tokens"}, targets) for some captions, padded to the longest (+ extra)."""
    chosen = [encoded[row] for row in rows]
    width = max(len(c) for c in chosen) + 1 + extra_padding
    tokens = np.zeros((len(chosen), width), np.int32)
    targets = np.zeros((len(chosen), width), np.int32)
    for i, caption in enumerate(chosen):
        tokens[i, : len(caption) + 1] = [START_ID, *caption]
        targets[i, : len(caption) + 1] = [*caption, END_ID]
    features = np.random.default_rng(seed).random((len(chosen), FEATURE_DIM), dtype=np.float32)
    return {"features": features, "tokens": tokens}, targets


def trained(
    vocab_size: int,
    encoded,
    cfg: ModelConfig = REFERENCE_SIZES,
    precision="float32",
    steps: int = 3,
) -> keras.Model:
    """A model fitted for a few steps, so its outputs are far from the uniform initial ones."""
    keras.utils.set_random_seed(1)
    model = merge.build_model(FEATURE_DIM, vocab_size, cfg, precision=precision)
    merge.compile_model(model, learning_rate=0.01)
    inputs, targets = batch(encoded, list(range(32)))
    model.fit(inputs, targets, batch_size=16, epochs=steps // 2 or 1, verbose=0)
    return model


@pytest.fixture(scope="module")
def small_model(captions) -> keras.Model:
    """A trained SMALL model shared by the tests that only read it."""
    vocab, encoded = captions
    return trained(vocab.size, encoded, SMALL)


@pytest.mark.slow
def test_whole_caption_model_equals_the_reference_per_prefix_model(captions):
    """Every prefix's next-word distribution from the notebook's model (its own layers, built as
    REFERENCE.md says, pre-padded prefixes, our weights copied in) equals ours at that step."""
    vocab, encoded = captions
    model = trained(vocab.size, encoded)  # reference sizes: 256, 256, dropout 0.4
    max_length = max(len(c) for c in encoded) + 2
    prefix_model = build_prefix_model(FEATURE_DIM, vocab.size, max_length)
    copy_merge_weights(model, prefix_model)

    rows = [40, 41, 77, 120, 150, 199]  # captions of different lengths, not trained on
    inputs, targets = batch(encoded, rows)
    ours = keras.ops.convert_to_numpy(keras.ops.softmax(model(inputs)))  # (B, T, V)
    features, prefixes, expected = [], [], []
    for i in range(len(rows)):
        length = int((targets[i] != 0).sum())
        for t in range(length):  # prefix = tokens[:t + 1], pre-padded as the notebook did
            prefix = inputs["tokens"][i, : t + 1]
            prefixes.append(np.pad(prefix, (max_length - len(prefix), 0)))
            features.append(inputs["features"][i])
            expected.append(ours[i, t])
    reference = prefix_model.predict([np.array(features), np.array(prefixes)], verbose=0)
    assert reference.shape == (len(expected), vocab.size) and len(expected) > 50
    np.testing.assert_allclose(reference, np.array(expected), atol=1e-5)
    assert np.abs(np.diff(reference, axis=0)).max() > 0.01  # the prefixes matter: 1000 x atol


def test_padding_does_not_change_the_loss(captions, small_model):
    _, encoded = captions
    model = small_model
    rows = [3, 50, 90, 140]
    losses = [model.evaluate(*batch(encoded, rows, extra), verbose=0) for extra in (0, 9)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    # and equals the compiled Keras loss on the full logits, which skips target id 0
    inputs, targets = batch(encoded, rows, extra_padding=9)
    keras_loss = model.loss(targets, model(inputs))
    assert float(keras_loss) == pytest.approx(losses[0], rel=1e-5)
    assert float(keras_loss) > 1.0  # a real loss, not a degenerate 0


# 3 rows of 3 lengths; 13 rows of many lengths (a packed LSTM step of each size); a GRU, which
# is not packed (its layers run over the padded batch)
@pytest.mark.parametrize(
    "rows, cell",
    [([5, 60, 130], "lstm"), (list(range(0, 195, 15)), "lstm"), (list(range(0, 195, 15)), "gru")],
)
def test_fused_output_loss_has_the_gradients_of_dense_plus_crossentropy(
    captions, small_model, rows, cell
):
    """MergeModel's training loss (the LSTM packed, the output layer only at real words) equals
    Dense + Keras' loss on the whole padded batch through the functional model, value and
    gradients."""
    vocab, encoded = captions
    model = small_model if cell == "lstm" else trained(vocab.size, encoded, SMALL_GRU)
    varied = [encoded[row][: 2 + 3 * index % 11] for index, row in enumerate(rows)]  # lengths
    inputs, targets = batch(varied, list(range(len(rows))), extra_padding=3)
    assert len({int(n) for n in (targets != 0).sum(axis=1)}) >= min(len(rows), 4)
    weights = model.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        fused, _, count = model._loss_terms(inputs, targets, training=True)
        plain = model.loss(targets, model(inputs, training=True))
    assert int(count) == int((targets != 0).sum())
    assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    for weight, a, b in zip(
        weights, tape.gradient(fused, weights), tape.gradient(plain, weights), strict=True
    ):
        a, b = tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy()
        np.testing.assert_allclose(a, b, atol=1e-6 + 1e-4 * np.abs(b).max(), err_msg=weight.path)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_fused_output_loss_with_label_smoothing_equals_keras(smoothing):
    """output_cross_entropy(..., smoothing=e) equals Dense + CategoricalCrossentropy with
    label_smoothing=e on one-hot targets: value and the gradients of all three inputs."""
    rng = np.random.default_rng(0)
    hidden = tf.constant(rng.normal(size=(9, 6)), tf.float32)
    kernel = tf.constant(rng.normal(size=(6, 11)), tf.float32)
    bias = tf.constant(rng.normal(size=11), tf.float32)
    labels = tf.constant(rng.integers(0, 11, size=9), tf.int32)
    keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([hidden, kernel, bias])
        fused = shared.output_cross_entropy(hidden, kernel, bias, labels, smoothing)
        plain = keras_loss(tf.one_hot(labels, 11), hidden @ kernel + bias)
    assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    assert float(fused) > 1.0  # random logits: a real loss
    gradients = [tape.gradient(loss, [hidden, kernel, bias]) for loss in (fused, plain)]
    for a, b in zip(*gradients, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_step_by_step_decoding_equals_the_full_sequence_logits(captions, small_model, cell):
    vocab, encoded = captions
    model = (
        small_model
        if cell == "lstm"
        else trained(vocab.size, encoded, ModelConfig(units=32, embed_dim=16, cell=cell))
    )
    inputs, targets = batch(encoded, [7, 8, 9])
    full = keras.ops.convert_to_numpy(model(inputs))  # (B, T, V)
    decoder = models.decoder_for(model)  # the interface decode.py runs on
    assert decoder.vocab_size == vocab.size and decoder.hidden_size == 32
    assert (decoder._token_table() is None) == (cell == "gru")
    # the Keras cell, and the compiled step decode.py uses (for an LSTM: its looked-up input
    # projection under XLA)
    for step in (decoder.step, decoder.step_fn()):
        state = decoder.start(inputs["features"])
        assert len(state[0]) == 1 and len(state[1]) == (2 if cell == "lstm" else 1)
        for t in range(inputs["tokens"].shape[1]):
            hidden, state, attention = step(inputs["tokens"][:, t], state)
            logits = decoder.logits(hidden)
            assert attention is None
            real = targets[:, t] != 0  # past a caption's end, decoding would have stopped
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(logits)[real], full[real, t], atol=1e-5
            )


def test_save_and_load_in_safe_mode_round_trips_and_resumes(captions, small_model, tmp_path):
    _, encoded = captions
    small_model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert isinstance(loaded, merge.MergeModel)
    inputs, targets = batch(encoded, [1, 2, 3, 4])
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), small_model.predict(inputs, verbose=0)
    )
    # Adam's state comes back too, so a resumed run continues where it stopped
    assert int(loaded.optimizer.iterations) == int(small_model.optimizer.iterations) > 0
    for saved, restored in zip(
        small_model.optimizer.variables, loaded.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
    before = loaded.evaluate(inputs, targets, verbose=0)
    loaded.fit(inputs, targets, batch_size=4, epochs=3, verbose=0)
    assert loaded.evaluate(inputs, targets, verbose=0) < before


@pytest.mark.slow
def test_bfloat16_builds_with_float32_logits_and_trains(captions):
    vocab, encoded = captions
    cfg = ModelConfig(units=64, embed_dim=32)
    keras.utils.set_random_seed(1)
    model = merge.build_model(FEATURE_DIM, vocab.size, cfg, precision="bfloat16")
    merge.compile_model(model, learning_rate=0.01)
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies["logits"] == policies["decoder_dense"] == "mixed_bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)
    inputs, targets = batch(encoded, list(range(32)))
    assert model(inputs).dtype == "float32"
    before = model.evaluate(inputs, targets, verbose=0)
    model.fit(inputs, targets, batch_size=16, epochs=3, verbose=0)
    assert model.evaluate(inputs, targets, verbose=0) < before - 0.3

    # the same weights in float32 give nearly the same logits (bfloat16 keeps ~3 digits)
    exact = merge.build_model(FEATURE_DIM, vocab.size, cfg)
    exact.set_weights(model.get_weights())
    difference = np.abs(keras.ops.convert_to_numpy(model(inputs) - exact(inputs)))
    assert difference.max() < 0.05 * np.abs(keras.ops.convert_to_numpy(exact(inputs))).max()
    decoder = models.decoder_for(model)
    hidden, _, _ = decoder.step(inputs["tokens"][:, 0], decoder.start(inputs["features"]))
    assert decoder.logits(hidden).dtype == "float32"


def test_bad_settings_raise_captioner_errors():
    with pytest.raises(CaptionerError, match="model.cell"):
        merge.build_model(8, 20, ModelConfig(cell="transformer"))
    with pytest.raises(CaptionerError, match="train.precision"):
        merge.build_model(8, 20, ModelConfig(), precision="float16")
    with pytest.raises(CaptionerError, match="statistics"):
        merge.build_model(8, 20, ModelConfig(normalize_features=True))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_models_saved_before_the_models_package_still_load_and_decode(name):
    """tests/data/old_merge_*.keras were saved by captioner/model.py before captioner/models/
    existed (registered as captioner>MergeModel; an LSTM with feature_norm in float32, a GRU in
    bfloat16), with their logits for fixed inputs in old_merge_logits.json."""
    from captioner import decode

    expected = json.loads((DATA / "old_merge_logits.json").read_text())
    model = models.load_saved(DATA / f"old_merge_{name}.keras", "train it again")
    assert isinstance(model, merge.MergeModel)
    inputs = {
        "features": np.array(expected["features"], np.float32),
        "tokens": np.array(expected["tokens"], np.int32),
    }
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(inputs)), expected[name], atol=1e-5)
    decoder = models.decoder_for(model)
    assert decoder.name == "merge" and decoder.vocab_size == 12
    assert len(decode.beam_search(model, inputs["features"], 5, beam=2)) == 2
    # a resumed old run trains its LSTM packed too, with the same loss as the functional model
    assert packed_lstm.supports(model.get_layer("rnn")) == (name == "lstm")
    assert inputs["tokens"].tolist() == [[START_ID, 4, 5, 0], [START_ID, 6, 7, 8]]
    targets = np.array([[4, 5, END_ID, 0], [6, 7, 8, END_ID]], np.int32)
    _, loss, _ = model._loss_terms(inputs, targets, training=False)
    assert float(loss) == pytest.approx(float(model.loss(targets, model(inputs))), rel=1e-5)


def test_the_config_offers_every_decoder_and_build_follows_it():
    from captioner.config import LIMITS, load_config

    assert LIMITS["model.decoder"] == tuple(models.DECODERS)
    assert models.DEFAULT_DECODER == "merge"
    cfg = load_config(None, ("model.units=8", "model.embed_dim=4"), dataset="mini")
    model = models.build(cfg, {"dim": 6, "encoder": "x", "count": 1}, 20)
    assert isinstance(model, merge.MergeModel) and model.optimizer is not None
    assert models.decoder_for(model).vocab_size == 20
    with pytest.raises(CaptionerError, match="none of the decoders"):
        models.decoder_for(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
