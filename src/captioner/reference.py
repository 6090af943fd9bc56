"""Faithful re-implementation of the old notebook approach (REFERENCE.md), used only as a baseline
by tests and scripts/bench_*.py.

Each section below has one owner (docs/CONTRACTS.md). Nothing in the package imports this module.
"""

from __future__ import annotations

import keras
import numpy as np

from captioner.text import END_ID, SPECIAL_TOKENS, START_ID
from captioner.tokenizer import Vocabulary

# =================================================================================================
# Decoder (issue 5): greedy, one model.predict per word, re-tokenizing the text so far.
# =================================================================================================

START_WORD, END_WORD = "startseq", "endseq"  # the notebook wrapped captions in literal words
_KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'  # keras Tokenizer's default filters


def reference_word_index(vocab: Vocabulary) -> dict[str, int]:
    """The notebook's `tokenizer.word_index` over our ids (<start>/<end> become startseq/endseq).

    Padding and <unk> are not in the index: the notebook had no unknown token.
    """
    index = {token: i for i, token in enumerate(vocab.tokens) if token not in SPECIAL_TOKENS}
    index[START_WORD], index[END_WORD] = START_ID, END_ID
    return index


def texts_to_sequences(texts: list[str], word_index: dict[str, int]) -> list[list[int]]:
    """Keras 2's Tokenizer.texts_to_sequences: lower-case, filter punctuation, drop unknown
    words."""
    table = str.maketrans(_KERAS_FILTERS, " " * len(_KERAS_FILTERS))
    return [
        [word_index[w] for w in text.lower().translate(table).split() if w in word_index]
        for text in texts
    ]


def reference_prefix_model(model: keras.Model, max_length: int) -> keras.Model:
    """The notebook's per-prefix model (build_prefix_model below) with our `model`'s weights.

    features (1, D) and a pre-padded prefix (1, max_length) -> next-word probabilities (1, V).
    """
    units = model.get_layer("rnn").units
    if model.get_layer("embedding").output_dim != units or any(
        layer.name == "feature_norm" for layer in model.layers
    ):
        raise ValueError("the notebook's model has embed_dim == units and no feature_norm")
    prefix_model = build_prefix_model(
        model.get_layer("features").output.shape[-1],
        model.get_layer("logits").units,
        max_length,
        units,
    )
    copy_merge_weights(model, prefix_model)
    return prefix_model


def word_for_id(integer: int, word_index: dict[str, int]) -> str | None:
    """The notebook's lookup: scan the whole index for the word with this id."""
    for word, index in word_index.items():
        if index == integer:
            return word
    return None


def generate_desc(
    prefix_model: keras.Model, word_index: dict[str, int], photo: np.ndarray, max_length: int
) -> str:
    """The notebook's greedy decoder: "startseq w1 ... endseq" for one photo (1, D)."""
    in_text = START_WORD
    for _ in range(max_length):
        sequence = texts_to_sequences([in_text], word_index)[0]
        sequence = keras.utils.pad_sequences([sequence], maxlen=max_length)  # pre-padding
        yhat = prefix_model.predict([photo, sequence], verbose=0)
        word = word_for_id(int(np.argmax(yhat)), word_index)
        if word is None:
            break
        in_text += " " + word
        if word == END_WORD:
            break
    return in_text


# =================================================================================================
# Features (issue 3): VGG16 fc2, one image at a time, one model.predict per image.
# =================================================================================================


def reference_vgg16(weights: str | None = "imagenet") -> keras.Model:
    """The notebook's encoder: VGG16 with its classifier layer cut off (output = fc2, 4096-d)."""
    vgg = keras.applications.VGG16(weights=weights)
    return keras.Model(inputs=vgg.inputs, outputs=vgg.layers[-2].output)


def reference_features(model: keras.Model, paths: list[str]) -> dict[str, np.ndarray]:
    """The notebook's extraction loop: {image id (name without extension): feature (1, 4096)}."""
    from keras.applications.vgg16 import preprocess_input
    from keras.utils import img_to_array, load_img

    features = {}
    for path in paths:
        image = load_img(path, target_size=(224, 224))
        image = img_to_array(image)
        image = image.reshape((1, image.shape[0], image.shape[1], image.shape[2]))
        image = preprocess_input(image)
        feature = model.predict(image, verbose=0)
        image_id = str(path).replace("\\", "/").split("/")[-1].split(".")[0]
        features[image_id] = feature
    return features


# =================================================================================================
# Per-prefix model and generator (issue 4): one training sample per caption prefix, pre-padded
# to max_length, with a one-hot target; batches hold the samples of 32 images.
# =================================================================================================


def fit_word_index(captions: list[str]) -> dict[str, int]:
    """keras 2 `Tokenizer().fit_on_texts(["startseq " + c + " endseq"]).word_index`.

    Clean captions in; the most frequent word gets 1 (ties: first seen first), 0 is padding,
    no minimum count and no unknown token. The vocabulary size is len(index) + 1.
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for word in f"{START_WORD} {caption} {END_WORD}".split():
            counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts, key=counts.__getitem__, reverse=True)  # stable: ties keep first seen
    return {word: i for i, word in enumerate(ranked, start=1)}


def build_prefix_model(
    feature_dim: int, vocab_size: int, max_length: int, units: int = 256, dropout: float = 0.4
) -> keras.Model:
    """The notebook's merge model, from scratch: ([features (B, D), prefix (B, max_length)]) ->
    next-word probabilities (B, V); Adam and categorical cross-entropy on one-hot targets.

    Layer names match ours (model.py), so `copy_merge_weights` can copy a trained model in.
    """
    from keras import layers

    features = keras.Input((feature_dim,))
    image = layers.Dropout(dropout)(features)
    image = layers.Dense(units, activation="relu", name="image_dense")(image)
    prefix = keras.Input((max_length,))
    text = layers.Embedding(vocab_size, units, mask_zero=True, name="embedding")(prefix)
    text = layers.Dropout(dropout)(text)
    text = layers.LSTM(units, name="rnn")(text)  # last state only
    hidden = layers.Dense(units, activation="relu", name="decoder_dense")(layers.add([image, text]))
    outputs = layers.Dense(vocab_size, activation="softmax", name="logits")(hidden)
    prefix_model = keras.Model([features, prefix], outputs)
    prefix_model.compile(loss="categorical_crossentropy", optimizer="adam")
    return prefix_model


def copy_merge_weights(source: keras.Model, prefix_model: keras.Model) -> None:
    """Copy a whole-caption model's weights (model.build_model) into `build_prefix_model`'s."""
    for name in ("image_dense", "embedding", "rnn", "decoder_dense", "logits"):
        prefix_model.get_layer(name).set_weights(source.get_layer(name).get_weights())


def prefix_batches(
    features: np.ndarray,
    image_captions: dict[int, list[str]],
    word_index: dict[str, int],
    max_length: int,
    images_per_batch: int = 32,
):
    """The notebook's `data_generator`, one pass: ([X1 (S, D), X2 (S, max_length)], y (S, V)).

    `image_captions` maps a feature row to its clean captions. Every caption is re-tokenized and
    every prefix padded and one-hot encoded sample by sample, in Python, as the notebook did.
    """
    vocab_size = len(word_index) + 1
    photos, prefixes, targets, images = [], [], [], 0
    for row, captions in image_captions.items():
        photo = features[row]
        for caption in captions:
            sequence = texts_to_sequences([f"{START_WORD} {caption} {END_WORD}"], word_index)[0]
            for i in range(1, len(sequence)):
                prefix = keras.utils.pad_sequences([sequence[:i]], maxlen=max_length)[0]
                target = keras.utils.to_categorical([sequence[i]], num_classes=vocab_size)[0]
                photos.append(photo)
                prefixes.append(prefix)
                targets.append(target)
        images += 1
        if images == images_per_batch:
            # float32 one-hot, as keras 2's to_categorical gave (keras 3's gives float64)
            yield [np.array(photos), np.array(prefixes)], np.array(targets, dtype=np.float32)
            photos, prefixes, targets, images = [], [], [], 0
    if images:
        yield [np.array(photos), np.array(prefixes)], np.array(targets, dtype=np.float32)
