"""The attention model: the whole-caption model equals its step-by-step decoder, attention maps
are distributions over the regions, the doubly stochastic regulariser and the fused loss have
the values they should, beam search carries the maps of its words, and saving round-trips."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from tinydata import fixture_captions

from captioner import decode, models
from captioner.config import ModelConfig
from captioner.models import attention
from captioner.text import END_ID, START_ID, normalize
from captioner.tokenizer import Vocabulary

GRID = (3, 4, 6)  # H, W, C: L = 12 regions of 6 channels
REGIONS = GRID[0] * GRID[1]
# Mechanics, not sizes; no dropout, so training-mode outputs are deterministic.
SMALL = ModelConfig(decoder="attention", units=24, embed_dim=16, attention_units=20, dropout=0.0)


@pytest.fixture(scope="module")
def captions(flickr8k_like) -> tuple[Vocabulary, list[list[int]]]:
    """The vocabulary (no min count) and encoded captions of the first 40 training images."""
    names = (flickr8k_like / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text()
    by_image = fixture_captions(flickr8k_like)
    texts = [normalize(raw) for name in names.split()[:40] for raw in by_image[name]]
    vocab = Vocabulary.from_captions(texts, min_count=1)
    return vocab, [vocab.encode(text) for text in texts]


def batch(encoded: list[list[int]], rows: list[int], extra_padding: int = 0, seed: int = 0):
    """({"features" (B, H, W, C), "tokens"}, targets) for some captions, padded to the longest
    (+ extra). Each image's regions differ in scale, so where the model looks matters."""
    chosen = [encoded[row] for row in rows]
    width = max(len(c) for c in chosen) + 1 + extra_padding
    tokens = np.zeros((len(chosen), width), np.int32)
    targets = np.zeros((len(chosen), width), np.int32)
    for i, caption in enumerate(chosen):
        tokens[i, : len(caption) + 1] = [START_ID, *caption]
        targets[i, : len(caption) + 1] = [*caption, END_ID]
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(chosen), *GRID)) * rng.uniform(
        0.2, 3, (len(chosen), *GRID[:2], 1)
    )
    return {"features": features.astype(np.float32), "tokens": tokens}, targets


def trained(vocab_size: int, encoded, cfg: ModelConfig = SMALL, precision="float32"):
    """A model fitted for a few steps, so its outputs are far from the initial ones."""
    keras.utils.set_random_seed(1)
    model = attention.build_model(GRID, vocab_size, cfg, precision=precision)
    attention.compile_model(model, learning_rate=0.01)
    inputs, targets = batch(encoded, list(range(32)))
    model.fit(inputs, targets, batch_size=16, epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def small_model(captions) -> keras.Model:
    vocab, encoded = captions
    return trained(vocab.size, encoded)


def teacher_forced_attention(model, inputs) -> np.ndarray:
    """alpha (B, T, L) of the whole-caption model for the given tokens."""
    *_, alpha = model._sequence_model(inputs, training=False)
    return keras.ops.convert_to_numpy(alpha)


def test_step_by_step_decoding_equals_the_whole_caption_logits(captions, small_model):
    vocab, encoded = captions
    model = small_model
    inputs, targets = batch(encoded, [7, 8, 9, 60], seed=3)
    full = keras.ops.convert_to_numpy(model(inputs))  # (B, T, V)
    alpha_full = teacher_forced_attention(model, inputs)  # (B, T, L)
    decoder = models.decoder_for(model)  # the interface decode.py runs on
    assert decoder.name == "attention" and decoder.regions == REGIONS
    assert decoder.vocab_size == vocab.size and decoder.hidden_size == SMALL.embed_dim
    for step in (decoder.step, decoder.step_fn()):  # eager Keras layers, compiled with XLA
        state = decoder.start(inputs["features"])
        for t in range(inputs["tokens"].shape[1]):
            hidden, state, alpha = step(inputs["tokens"][:, t], state)
            real = targets[:, t] != 0  # past a caption's end, decoding would have stopped
            logits = keras.ops.convert_to_numpy(decoder.logits(hidden))
            np.testing.assert_allclose(logits[real], full[real, t], atol=2e-5)
            alpha = keras.ops.convert_to_numpy(alpha)
            np.testing.assert_allclose(alpha[real], alpha_full[real, t], atol=1e-6)
    assert np.abs(np.diff(full, axis=1)).max() > 0.1  # the steps differ: not a constant model


def test_attention_weights_are_distributions_over_the_regions(captions, small_model):
    _, encoded = captions
    inputs, _ = batch(encoded, [1, 2, 3], extra_padding=2, seed=4)
    alpha = teacher_forced_attention(small_model, inputs)  # (B, T, L)
    assert alpha.shape == (3, inputs["tokens"].shape[1], REGIONS)
    assert alpha.min() >= 0
    real = inputs["tokens"] != 0  # past its end a caption's rows are not computed: zeros
    np.testing.assert_allclose(alpha.sum(axis=-1), real.astype(np.float32), atol=1e-5)
    # where it looks depends on the image and on the word: not uniform, not constant
    assert alpha.max() > 2.0 / REGIONS
    assert np.abs(np.diff(alpha, axis=1)).max() > 1e-3


def test_doubly_stochastic_penalty_has_the_papers_value():
    """lambda * sum_i (1 - sum_t alpha_ti)^2, over each caption's real steps only."""
    rng = np.random.default_rng(0)
    alpha = rng.dirichlet(np.ones(5), size=(2, 4)).astype(np.float32)  # (B=2, T=4, L=5)
    real = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)  # the second caption has 2 steps
    expected = sum(
        ((1 - alpha[b, real[b]].sum(axis=0)) ** 2).sum() for b in range(2)
    )  # by the formula, caption by caption
    value = float(attention.doubly_stochastic_penalty(alpha, real))
    assert value == pytest.approx(expected, rel=1e-6)
    # every region attended exactly once over the caption costs nothing
    once = np.eye(4, dtype=np.float32)[None]  # T = L = 4, alpha_t = one-hot of region t
    assert float(attention.doubly_stochastic_penalty(once, np.ones((1, 4), bool))) == 0.0


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_fused_loss_equals_keras_loss_plus_the_regulariser(captions, weight):
    """The training objective (the output layers only at real words, fused with the loss) has the
    value and gradients of Keras' loss on the whole padded batch + lambda * penalty / N; "loss"
    is the cross-entropy alone."""
    vocab, encoded = captions
    cfg = dataclasses.replace(SMALL, doubly_stochastic=weight)
    model = trained(vocab.size, encoded, cfg)
    rows = list(range(0, 195, 15))  # many lengths
    varied = [encoded[row][: 2 + 3 * index % 11] for index, row in enumerate(rows)]
    inputs, targets = batch(varied, list(range(len(rows))), extra_padding=3)
    real = targets != 0
    weights = model.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        objective, loss, count = model._loss_terms(inputs, targets, training=True)
        *_, alpha = model._sequence_model(inputs, training=True)
        penalty = attention.doubly_stochastic_penalty(alpha, real)
        plain = model.loss(targets, model(inputs, training=True)) + weight * penalty / real.sum()
    assert int(count) == int(real.sum())
    assert float(loss) == pytest.approx(float(model.loss(targets, model(inputs))), rel=1e-5)
    assert float(objective) == pytest.approx(float(plain), rel=1e-5)
    assert (float(objective) > float(loss) + 0.1) == (weight > 0)
    for weight_variable, a, b in zip(
        weights, tape.gradient(objective, weights), tape.gradient(plain, weights), strict=True
    ):
        a, b = tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy()
        np.testing.assert_allclose(
            a, b, atol=1e-6 + 1e-4 * np.abs(b).max(), err_msg=weight_variable.path
        )


def test_greedy_and_beam_search_return_the_maps_of_their_words(captions, small_model):
    """Each caption's maps are (words, L), one row per word, and equal the attention the
    whole-caption model computes when fed that caption: beam search kept the maps of the
    hypothesis that won, not of another beam."""
    vocab, _ = captions
    rng = np.random.default_rng(5)
    features = (rng.normal(size=(6, *GRID)) * rng.uniform(0.2, 3, (6, *GRID[:2], 1))).astype(
        np.float32
    )
    plain = decode.beam_search(small_model, features, 12, beam=3)
    for ids, maps in (
        decode.greedy(small_model, features, 12, attention=True),
        decode.beam_search(small_model, features, 12, beam=3, attention=True),
        decode.decode(small_model, features, 12, beam=3, length_penalty=0.7, attention=True),
    ):
        assert len(ids) == len(maps) == len(features)
        for words, image, caption_maps in zip(ids, features, maps, strict=True):
            assert caption_maps.shape == (len(words), REGIONS) and caption_maps.dtype == np.float32
            tokens = np.array([[START_ID, *words]], np.int32)
            expected = teacher_forced_attention(
                small_model, {"features": image[None], "tokens": tokens}
            )[0, : len(words)]
            np.testing.assert_allclose(caption_maps, expected, atol=1e-5)
    assert decode.beam_search(small_model, features, 12, beam=3, attention=True)[0] == plain
    assert any(len(words) > 1 for words in plain)
    assert decode.greedy(small_model, features[:0], 12, attention=True) == ([], [])


def test_merge_models_have_no_maps():
    from captioner.models import merge

    model = merge.build_model(5, 12, ModelConfig(units=8, embed_dim=4))
    features = np.zeros((2, 5), np.float32)
    ids, maps = decode.beam_search(model, features, 4, beam=2, attention=True)
    assert maps is None and ids == decode.beam_search(model, features, 4, beam=2)
    assert models.decoder_for(model).regions is None


def test_save_and_load_in_safe_mode_round_trips_and_resumes(captions, small_model, tmp_path):
    _, encoded = captions
    small_model.save(tmp_path / "model.keras")
    loaded = models.load_saved(tmp_path / "model.keras", "train it again")
    assert isinstance(loaded, attention.AttentionModel)
    inputs, targets = batch(encoded, [1, 2, 3, 4])
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), small_model.predict(inputs, verbose=0)
    )
    layer = loaded.get_layer("attention_lstm")
    assert (layer.units, layer.attention_units, layer.doubly_stochastic) == (24, 20, 1.0)
    assert int(loaded.optimizer.iterations) == int(small_model.optimizer.iterations) > 0
    for saved, restored in zip(
        small_model.optimizer.variables, loaded.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
    features = inputs["features"]
    assert decode.beam_search(loaded, features, 8, beam=2) == decode.beam_search(
        small_model, features, 8, beam=2
    )
    before = loaded.evaluate(inputs, targets, verbose=0)
    loaded.fit(inputs, targets, batch_size=4, epochs=3, verbose=0)
    assert loaded.evaluate(inputs, targets, verbose=0) < before


@pytest.mark.slow
def test_bfloat16_and_normalised_features_train_and_decode(captions):
    vocab, encoded = captions
    inputs, targets = batch(encoded, list(range(32)))
    regions = inputs["features"].reshape(-1, GRID[2])
    cfg = dataclasses.replace(SMALL, normalize_features=True)
    keras.utils.set_random_seed(1)
    model = attention.build_model(
        GRID, vocab.size, cfg, regions.mean(0), regions.var(0), precision="bfloat16"
    )
    attention.compile_model(model, learning_rate=0.01)
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies["logits"] == policies["deep_output"] == "mixed_bfloat16"
    assert policies["attention_lstm"] == "float32"
    assert model(inputs).dtype == "float32"
    before = model.evaluate(inputs, targets, verbose=0)
    model.fit(inputs, targets, batch_size=16, epochs=3, verbose=0)
    assert model.evaluate(inputs, targets, verbose=0) < before - 0.3
    decoder = models.decoder_for(model)
    hidden, _, alpha = decoder.step(inputs["tokens"][:, 0], decoder.start(inputs["features"]))
    assert decoder.logits(hidden).dtype == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(alpha).sum(-1), 1.0, atol=1e-5)
    assert len(decode.greedy(model, inputs["features"][:4], 6)) == 4


def test_bad_settings_are_one_line_errors():
    from captioner.config import load_config
    from captioner.errors import CaptionerError, ConfigError

    with pytest.raises(CaptionerError, match="model.cell must be lstm"):
        attention.build_model(GRID, 20, ModelConfig(cell="gru"))
    with pytest.raises(ConfigError, match="model.cell"):
        load_config(None, ("model.decoder=attention", "model.cell=gru"), dataset="mini")
    with pytest.raises(ConfigError, match="doubly_stochastic"):
        load_config(None, ("model.doubly_stochastic=-1",), dataset="mini")
    cfg = load_config(None, ("model.decoder=attention", "model.units=8"), dataset="mini")
    with pytest.raises(CaptionerError, match="needs a grid cache"):
        models.build(cfg, {"dim": 6, "encoder": "x", "count": 1}, 20)
    model = models.build(cfg, {"dim": 6, "grid": [2, 3], "layout": "grid", "count": 1}, 20)
    assert isinstance(model, attention.AttentionModel) and model.optimizer is not None
    assert models.decoder_for(model).regions == 6


@pytest.mark.slow  # extracts, trains, evaluates and captions a tiny demo run (~1 min)
def test_a_tiny_attention_run_trains_evaluates_and_captions_from_the_cli(tmp_path):
    """`captioner train --decoder attention` extracts the grid it needs, trains, and the run is
    evaluated and captions new images without being told which decoder it is: the captions of
    the test images from `captioner caption` equal those `captioner evaluate` made from the
    cache."""
    import json

    import pandas as pd
    from click.testing import CliRunner

    from captioner.cli import main
    from captioner.io import read_json

    data, runs = tmp_path / "data", tmp_path / "runs"
    settings = {
        "demo.train_images": 40,
        "demo.dev_images": 10,
        "demo.test_images": 5,
        "demo.image_size": 64,
        "features.image_size": 64,  # VGG16's block5_conv3 is then a 4x4 grid
        "features.dtype": "float32",  # the cache's rows equal the encoder's: the same captions
        "model.units": 16,
        "model.embed_dim": 8,
        "model.attention_units": 8,
        "tokenizer.min_count": 2,
        "train.runs_dir": runs,
    }
    result = CliRunner().invoke(
        main,
        ["train", "--dataset", "demo", "--data-dir", str(data), "--decoder", "attention"]
        + ["--epochs", "2", "--name", "a"]
        + [f"--set={key}={value}" for key, value in settings.items()],
    )
    assert result.exit_code == 0, result.output
    assert "features 4x4 grid of 512-d" in result.stderr
    config = read_json(runs / "a" / "config.json")
    assert config["model"]["decoder"] == "attention"
    assert read_json(runs / "a" / "features_meta.json")["grid"] == [4, 4]
    history = (runs / "a" / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "attention" in (runs / "a" / "README.md").read_text()

    scored = CliRunner().invoke(main, ["evaluate", "--run", str(runs / "a"), "--beam", "2"])
    assert scored.exit_code == 0, scored.output
    assert "BLEU-4" in scored.stdout
    predictions = pd.read_csv(next((runs / "a").glob("predictions-test-*.csv")), dtype=str)
    images = data / "demo" / "raw" / "Flicker8k_Dataset"
    captioned = CliRunner().invoke(
        main,
        ["caption", *(str(images / name) for name in predictions["image"])]
        + ["--model", str(runs / "a"), "--beam", "2", "--json"],
    )
    assert captioned.exit_code == 0, captioned.output
    lines = [json.loads(line) for line in captioned.stdout.splitlines()]
    assert [line["caption"] for line in lines] == list(predictions["caption"].fillna(""))
    assert any(line["caption"] for line in lines)
