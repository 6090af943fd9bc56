"""The training data: encoded captions of one split, feature statistics, and the tf.data pipeline.

Features stay a memory-mapped array: the dataset carries feature *row numbers* and gathers the
rows of one batch at a time, so memory does not grow with the number of captions or images.
Rows reach the model in the shape its decoder takes (feature_cache.for_decoder): `takes`
"pooled" gives (B, D), or (B, C) from a grid cache (mean over regions); "grid" gives (B, H, W, C).
TensorFlow is imported inside make_dataset, so the tokenizer stage does not pay for it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from captioner.errors import CaptionerError
from captioner.feature_cache import for_decoder
from captioner.io import log
from captioner.text import END_ID, START_ID
from captioner.tfdata import without_autotuner

if TYPE_CHECKING:
    import tensorflow as tf

    from captioner.tokenizer import Vocabulary

# Bucket width in tokens for `bucket=True`: batches pad to within 2 tokens of their longest caption.
# For evaluation only: training on length-bucketed batches learns much worse (make_dataset).
BUCKET_STEP = 2


def encode_split(
    frame: pd.DataFrame, vocab: Vocabulary, row_of: Mapping[str, int], split: str
) -> tuple[np.ndarray, list[list[int]]]:
    """Feature rows (N,) and encoded captions of a split; captions of images without features
    (e.g. unreadable images the feature stage skipped) are left out and counted in the log."""
    rows, captions, missing = [], [], set()
    for image, caption in zip(frame["image"], frame["caption"], strict=True):
        row = row_of.get(image)
        if row is None:
            missing.add(image)
            continue
        rows.append(row)
        captions.append(vocab.encode(caption))
    if missing:
        log(
            f"{split}: skipped {len(frame) - len(rows)} captions of {len(missing)} images "
            f"that have no feature row (e.g. {sorted(missing)[0]})"
        )
    return np.asarray(rows, dtype=np.int64), captions


VARIANCE_FLOOR = 0.01  # relative to the mean variance over dimensions
STATS_BYTES = 64 << 20  # feature_stats reads at most this much of the cache at a time


def feature_stats(
    features: np.ndarray,
    rows: np.ndarray,
    chunk_size: int = 2048,
    takes: str = "pooled",
    decoder: str = "merge",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (D,) of the given rows as the decoder takes them (for a grid decoder:
    over every region of every image), read in chunks: a memmap is never loaded whole."""
    unique = np.unique(rows)  # sorted: reads the memmap front to back
    if unique.size == 0:
        raise CaptionerError("no training features to compute statistics from")
    chunk_size = max(1, min(chunk_size, STATS_BYTES // max(1, features[:1].nbytes)))
    dimension = features.shape[-1]
    total = np.zeros(dimension, np.float64)
    total_sq = np.zeros(dimension, np.float64)
    count = 0
    for start in range(0, unique.size, chunk_size):
        chunk = for_decoder(features[unique[start : start + chunk_size]], takes, decoder)
        vectors = chunk.reshape(-1, dimension).astype(np.float64)  # (c, D) or (c*H*W, C)
        total += vectors.sum(axis=0)
        total_sq += np.square(vectors).sum(axis=0)
        count += len(vectors)
    mean = total / count
    variance = np.maximum(total_sq / count - np.square(mean), 0.0)
    # A dimension (almost) constant in training (a ReLU unit dead on every training image) would
    # be divided by ~0 and blow up on the few other images where it fires: floor the variance at
    # a small fraction of the typical one, so such dimensions stay near zero after standardising.
    variance = np.maximum(variance, VARIANCE_FLOOR * max(float(variance.mean()), 1e-12))
    return mean.astype(np.float32), variance.astype(np.float32)


def _row_reader(features: np.ndarray):
    """rows (B,) -> the stored rows (B, D) or (B, H, W, C). Rows of a memory-mapped .npy are
    read with pread: pages touched through the mapping would stay in this process's RSS (with
    readahead, the whole file within an epoch: +520 MB for Flickr30k), pages read stay in the
    page cache."""
    if not (isinstance(features, np.memmap) and features.filename and features.flags.c_contiguous):
        return lambda rows: features[rows]
    handle = open(features.filename, "rb")  # open as long as the dataset is
    row_bytes = features[:1].nbytes

    def read(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *features.shape[1:]), features.dtype)
        for i, row in enumerate(rows):
            os.preadv(handle.fileno(), [out[i]], features.offset + int(row) * row_bytes)
        return out

    return read


def make_dataset(
    features: np.ndarray,
    rows: Sequence[int],
    captions: Sequence[Sequence[int]],
    batch_size: int,
    shuffle: bool,
    seed: int,
    bucket: bool = False,
    shuffle_buffer: int = 0,
    takes: str = "pooled",
    decoder: str = "merge",
) -> tf.data.Dataset:
    """({"features": F float32, "tokens": (B, T) int32}, targets (B, T) int32) batches, F the
    shape decoder `decoder` takes (`takes`, its FEATURES): (B, D), or (B, H, W, C) for "grid".

    tokens = [<start>, w1..wn], targets = [w1..wn, <end>], both padded with 0 to the longest
    caption of the batch. `shuffle_buffer` 0 shuffles over the whole split.

    `bucket` batches captions of similar length together, so little padding is computed: use it
    to *evaluate* (the loss is the same), never to train. Every bucketed batch holds captions of
    one length, so each step teaches one place to stop, and on real Flickr8k features the model
    learned much worse: dev loss 3.04 instead of 2.87, P(<end>) at the true end .19 instead of
    .5, a fifth of captions run to the length cap (docs/TRAINING.md has the measurements).
    """
    import tensorflow as tf

    if len(captions) == 0:
        raise CaptionerError("no captions to train on (none of the split's images has features)")
    lengths = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    flat = np.fromiter(
        itertools.chain.from_iterable(captions), dtype=np.int32, count=int(lengths.sum())
    )
    ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)  # (N, None): no padding stored
    dataset = tf.data.Dataset.from_tensor_slices((np.asarray(rows, dtype=np.int64), ragged))
    if shuffle:
        dataset = dataset.shuffle(
            shuffle_buffer or len(captions), seed=seed, reshuffle_each_iteration=True
        )

    def add_start_end(row, words):  # words (n,) -> tokens (n+1,), targets (n+1,)
        return (row, tf.concat([[START_ID], words], 0), tf.concat([words, [END_ID]], 0))

    dataset = dataset.map(add_start_end, num_parallel_calls=tf.data.AUTOTUNE)
    if bucket:
        longest = int(lengths.max()) + 1
        boundaries = list(range(BUCKET_STEP + 1, longest + 1, BUCKET_STEP))
        dataset = dataset.bucket_by_sequence_length(
            lambda row, tokens, targets: tf.shape(tokens)[0],
            boundaries,
            [batch_size] * (len(boundaries) + 1),
        )
    else:
        dataset = dataset.padded_batch(batch_size)  # pads with 0 = <pad>

    # the shape of one row as the decoder takes it (a pooled cache for a grid decoder: one line)
    shape = for_decoder(features[:0], takes, decoder).shape[1:]
    read = _row_reader(features)

    def gather(rows: np.ndarray) -> np.ndarray:  # (B,) rows -> (B, *shape) float32
        return for_decoder(read(rows), takes, decoder)

    def with_features(batch_rows, tokens, targets):
        batch_features = tf.numpy_function(gather, [batch_rows], tf.float32, stateful=False)
        batch_features.set_shape((None, *shape))
        return {"features": batch_features, "tokens": tokens}, targets

    dataset = dataset.map(with_features, num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotuner(dataset.prefetch(tf.data.AUTOTUNE))
