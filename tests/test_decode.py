"""Decoding: greedy and beam search on tiny models, random and hand-built (known probabilities)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from captioner import decode, decode_loops, reference
from captioner.config import ModelConfig
from captioner.models.merge import build_model
from captioner.text import END_ID, PAD_ID, START_ID, UNK_ID
from captioner.tokenizer import Vocabulary

A, B, C = 4, 5, 6  # the three words of the hand-built models
SPECIAL = {PAD_ID, UNK_ID, START_ID}


def random_model(
    vocab_size: int = 30, feature_dim: int = 8, seed: int = 0, special_bias: float = -30.0
) -> keras.Model:
    """A tiny random merge model; `special_bias` is added to the pad/unk/start logits."""
    keras.utils.set_random_seed(seed)
    model = build_model(feature_dim, vocab_size, ModelConfig(embed_dim=16, units=16, dropout=0.0))
    kernel, bias = model.get_layer("logits").get_weights()
    kernel *= 8.0  # sharper distributions, so captions differ between images
    bias[[PAD_ID, UNK_ID, START_ID]] = special_bias
    model.get_layer("logits").set_weights([kernel, bias])
    return model


def markov_model(table: dict[int, dict[int, float]], vocab_size: int = 7) -> keras.Model:
    """A model whose next-word probabilities depend only on the previous token, set by hand.

    Embedding = one-hot * 3; the LSTM's gates are saturated open (input, output) and shut (forget)
    so h = h_value * one_hot(previous token); decoder_dense rescales that to an exact one-hot, and
    row `previous` of the logits kernel holds log P(next | previous). Missing entries get ~e^-30.
    """
    size = vocab_size
    model = build_model(2, size, ModelConfig(embed_dim=size, units=size, dropout=0.0))
    eye = np.eye(size, dtype=np.float32)
    model.get_layer("image_dense").set_weights([np.zeros((2, size)), np.zeros(size)])
    model.get_layer("embedding").set_weights([3.0 * eye])
    kernel = np.zeros((size, 4 * size), np.float32)
    kernel[:, 2 * size : 3 * size] = eye  # candidate cell value g = tanh(3) for the active unit
    bias = np.concatenate(
        [np.full(size, 20.0), np.full(size, -20.0), np.zeros(size), np.full(size, 20.0)]
    ).astype(np.float32)  # gates i, f, g, o
    model.get_layer("rnn").set_weights([kernel, np.zeros((size, 4 * size)), bias])
    sigmoid = 1.0 / (1.0 + np.exp(-20.0))
    h_value = sigmoid * np.tanh(sigmoid * np.tanh(3.0))
    model.get_layer("decoder_dense").set_weights([eye / h_value, np.zeros(size)])
    log_probs = np.full((size, size), -30.0, np.float32)
    for previous, row in table.items():
        for word, probability in row.items():
            log_probs[previous, word] = np.log(probability)
    model.get_layer("logits").set_weights([log_probs, np.zeros(size)])
    return model


FEATURES_2D = np.zeros((1, 2), np.float32)
# Greedy: a (0.6) -> c (0.4) -> end = 0.24.  Best: b (0.4) -> end (1.0) = 0.4.
GREEDY_MISSES = {
    START_ID: {A: 0.6, B: 0.4},
    A: {C: 0.4, END_ID: 0.3, A: 0.3},
    B: {END_ID: 1.0},
    C: {END_ID: 1.0},
}


def test_markov_model_has_the_probabilities_it_was_built_with():
    model = markov_model({START_ID: {A: 0.6, B: 0.4}})
    logits = model({"features": FEATURES_2D, "tokens": np.array([[START_ID]])})
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))[0, 0]
    np.testing.assert_allclose(probabilities[[A, B]], [0.6, 0.4], atol=1e-6)


def test_beam_finds_the_sequence_greedy_misses():
    model = markov_model(GREEDY_MISSES)
    assert decode.greedy(model, FEATURES_2D, 10) == [[A, C]]
    assert decode.beam_search(model, FEATURES_2D, 10, beam=1) == [[A, C]]
    assert decode.beam_search(model, FEATURES_2D, 10, beam=2) == [[B]]


def test_every_beam_ending_early_and_more_beams_than_words():
    # Every word is followed by <end> with probability 0.9: all beams end at step 2 of 10.
    after_word = {END_ID: 0.9, A: 0.05, B: 0.05}
    model = markov_model(
        {START_ID: {A: 0.5, B: 0.3, C: 0.2}, A: after_word, B: after_word, C: after_word}
    )
    for beam in (3, 5, 8):  # 8 > the 4 tokens allowed at the first step (a, b, c, <end>)
        assert decode.beam_search(model, np.zeros((3, 2), np.float32), 10, beam=beam) == [[A]] * 3


def test_length_penalty_prefers_the_longer_caption_when_set():
    # "a" scores log(.9 * .55) over 2 tokens; "a b" scores log(.9 * .45) over 3 tokens.
    model = markov_model(
        {START_ID: {A: 0.9, C: 0.1}, A: {END_ID: 0.55, B: 0.45}, B: {END_ID: 1.0}, C: {END_ID: 1.0}}
    )
    assert decode.beam_search(model, FEATURES_2D, 10, beam=2) == [[A]]
    assert decode.beam_search(model, FEATURES_2D, 10, beam=2, length_penalty=1.0) == [[A, B]]


def test_no_repeat_ngram_blocks_the_repeated_phrase():
    model = markov_model(
        {
            START_ID: {A: 1.0},
            A: {B: 0.7, END_ID: 0.2, C: 0.1},
            B: {A: 0.8, END_ID: 0.2},
            C: {END_ID: 1.0},
        }
    )
    assert decode.greedy(model, FEATURES_2D, 9) == [[A, B, A, B, A, B, A, B, A]]
    # "a b a" then "b" would repeat "a b": the next best after "a" is <end>.
    assert decode.beam_search(model, FEATURES_2D, 9, beam=1, no_repeat_ngram=2) == [[A, B, A]]
    # Trigrams: "a b a b" is allowed, "a b a b a" repeats "a b a"; P(a b a b <end>) = .0784.
    assert decode.beam_search(model, FEATURES_2D, 9, beam=1, no_repeat_ngram=3) == [[A, B, A, B]]


def test_beam_width_one_equals_greedy_and_batching_does_not_matter():
    model = random_model()
    features = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    greedy = decode.greedy(model, features, 8)
    assert len({tuple(words) for words in greedy}) > 1  # the captions are not all the same
    assert decode.beam_search(model, features, 8, beam=1) == greedy
    assert decode.greedy(model, features, 8, batch_size=5) == greedy
    assert decode.greedy(model, features[:0], 8) == []
    beam3 = decode.beam_search(model, features, 8, beam=3)
    assert decode.beam_search(model, features, 8, beam=3, batch_size=6) == beam3


def test_stepwise_greedy_equals_the_reference_decoder():
    """Stepping the LSTM state = re-running the pre-padded prefix through the notebook's model."""
    model = random_model(seed=3)
    vocab = Vocabulary(
        tokens=("<pad>", "<unk>", "<start>", "<end>") + tuple(f"w{i}" for i in range(26)),
        counts=(0,) * 30,
        max_length=6,
        settings={},
    )
    features = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    max_length = 6
    ours = decode.greedy(model, features, max_length)
    prefix_model = reference.reference_prefix_model(model, max_length)
    word_index = reference.reference_word_index(vocab)
    for row, words in zip(features, ours, strict=True):
        text = reference.generate_desc(prefix_model, word_index, row[None], max_length)
        expected = [w for w in text.split() if w not in ("startseq", "endseq")]
        assert [vocab.tokens[i] for i in words] == expected


def test_special_tokens_are_never_emitted():
    model = random_model(special_bias=20.0)  # unmasked, pad/unk/start would win every step
    features = np.random.default_rng(4).normal(size=(6, 8)).astype(np.float32)
    logits = model({"features": features, "tokens": np.full((6, 1), START_ID)})
    assert set(np.argmax(keras.ops.convert_to_numpy(logits)[:, 0], axis=-1)) <= SPECIAL
    outputs = decode.greedy(model, features, 8) + decode.beam_search(
        model, features, 8, beam=3, no_repeat_ngram=2
    )
    assert any(outputs)
    assert all(0 <= i < 30 and i not in SPECIAL | {END_ID} for words in outputs for i in words)


def test_bad_beam_width_is_refused():
    with pytest.raises(ValueError, match="beam"):
        decode.beam_search(random_model(), np.zeros((1, 8), np.float32), 4, beam=0)


def test_block_top_k_and_normaliser_are_exact_and_special_ids_come_first():
    import tensorflow as tf

    logits = tf.constant(
        np.random.default_rng(5).normal(size=(7, 5 * decode_loops.BLOCK)), tf.float32
    )
    maxima, normaliser = decode_loops._scan(logits)
    np.testing.assert_allclose(normaliser, tf.reduce_logsumexp(logits, 1, keepdims=True), 1e-6)
    for k in (1, 3, 6):  # 6 > the 5 blocks
        values, columns = decode_loops._top_k(logits, maxima, k)
        expected_values, expected_columns = tf.math.top_k(logits, k)
        np.testing.assert_array_equal(values.numpy(), expected_values.numpy())
        np.testing.assert_array_equal(columns.numpy(), expected_columns.numpy())
    # decoders project onto ids >= FIRST_ALLOWED, which relies on this order of text.py's ids
    assert max(decode_loops.NEVER_EMIT) < decode_loops.FIRST_ALLOWED == END_ID


def test_a_dropped_model_is_freed_with_its_compiled_decoders():
    import gc
    import weakref

    model = random_model()
    features = np.zeros((2, 8), np.float32)
    decode.greedy(model, features, 5)
    decode.beam_search(model, features, 5, beam=3)
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None


def graph_decode(model, features, max_length, beam, compiled=True, **settings):
    """decode_loops.decode_tokens traced in a tf.function, beam an int or a tensor input."""
    import tensorflow as tf

    from captioner.models import decoder_for

    decoder = decoder_for(model)
    if isinstance(beam, int):
        function = tf.function(
            lambda x: decode_loops.decode_tokens(
                decoder, x, max_length, beam, compiled=compiled, **settings
            )
        )
        ids, scores = function(tf.constant(features))
    else:
        function = tf.function(
            lambda x, width: decode_loops.decode_tokens(
                decoder, x, max_length, width, compiled=compiled, **settings
            )
        )
        ids, scores = function(tf.constant(features), tf.constant(beam[0]))
    return [decode._until_end(row) for row in ids.numpy()], scores.numpy()


def test_graph_loops_give_the_log_probability_and_take_the_beam_as_an_input():
    model = markov_model(GREEDY_MISSES)
    for compiled in (True, False):  # plain steps (as exported) decode alike
        ids, scores = graph_decode(model, FEATURES_2D, 10, 1, compiled)
        assert ids == [[A, C]]
        np.testing.assert_allclose(scores, [np.log(0.6 * 0.4 * 1.0)], atol=1e-4)
        ids, scores = graph_decode(model, FEATURES_2D, 10, 2, compiled)
        assert ids == [[B]]
        np.testing.assert_allclose(scores, [np.log(0.4 * 1.0)], atol=1e-4)
    # the width as a tensor: greedy at 1 (a tf.cond), beam search above
    for width, expected in ((1, [[A, C]]), (2, [[B]]), (5, [[B]])):
        assert graph_decode(model, FEATURES_2D, 10, [width])[0] == expected


def test_graph_loops_equal_the_compiled_decoders_on_a_random_model():
    """... and their log-probabilities are the captions' under the model, n-grams blocked or
    not: what likelihood.py (`captioner serve`) computes in one teacher-forced pass."""
    from captioner import likelihood

    model = random_model()
    features = np.random.default_rng(2).normal(size=(9, 8)).astype(np.float32)
    for beam, settings in ((1, {}), (3, {}), (3, {"length_penalty": 0.7, "no_repeat_ngram": 2})):
        expected = decode.decode(model, features, 8, beam, **settings)
        for width in (beam, [beam]):
            ids, scores = graph_decode(model, features, 8, width, compiled=False, **settings)
            assert ids == expected
            assert np.all(np.isfinite(scores)) and np.all(scores < 0)
            served = likelihood.log_probabilities(model, features, ids, 8)
            np.testing.assert_allclose(scores, served, rtol=1e-4, atol=1e-4)
