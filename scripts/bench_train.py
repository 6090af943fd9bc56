"""`bench.py train`: seconds per training epoch, ours against the reference approach, one run.

Data: Flickr8k-sized. The 6,000 official training images with their 5 real captions each (real
vocabulary and lengths, from the fixtures' Flickr8k.token.txt) and random 4096-d features in a
memory-mapped .npy, as the feature cache would give them.

- reference: the notebook's per-prefix generator (pre-padding, one-hot targets, the samples of 32
  images per batch) and model (reference.py), with a keras-Tokenizer word index of every caption
  word (no min count); a few batches timed with train_on_batch, scaled to an epoch.
- (a) same function: our model with the reference's sizes, vocabulary and float32, in batches of
  the 160 captions of 32 images, so a step learns from exactly the reference batch's (prefix, next
  word) pairs. `ratio_same_function` = reference_s / ours_same_function_s.
- (b) our defaults (tokenizer.min_count, train.batch_size, train.precision of config.py):
  `ratio_default` = reference_s / ours_s.
- floor_s: matmul FLOPs of one epoch of (a) at the measured float32 matmul peak.
- val_loss_*: dev-split loss after one epoch of (b) in float32 and bfloat16 and, as the noise
  scale, in float32 with another seed (not with --quick).
- breakdown_*: seconds per epoch of (a) in the output projection + softmax and in the RNN
  (forward + backward each, timed alone), and the rest.
- peak_rss_mb_30k: peak RSS of one epoch of (b) on a Flickr30k-sized set, in a subprocess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from bench_common import (
    machine,
    matmul_peak_gflops,
    peak_rss_mb,
    report,
    rss_child_data,
    rss_epoch,
)

from captioner.io import log

ROOT = Path(__file__).resolve().parents[1]
# CAPTIONER_SHARED: the folder holding fixtures/ (default ../shared), as for the tests.
FLICKR8K = Path(
    os.environ.get("CAPTIONER_SHARED", ROOT.parent / "shared"),
    "fixtures",
    "flickr8k",
    "Flickr8k_text",
)
FEATURE_DIM = 4096
IMAGES_PER_BATCH = 32  # the reference's batch: all samples of 32 images
FLICKR30K_IMAGES = 31_783
FLICKR30K_VOCAB = 7_000  # assumed size of a min_count=5 Flickr30k vocabulary (not in fixtures)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--quick", action="store_true", help="a tenth of the data (smoke test)")
    parser.add_argument("--images", type=int, help="training images (default 6000)")
    parser.add_argument("--reference-batches", type=int, help="reference batches timed")
    parser.add_argument("--rss-images", type=int, help=f"RSS run's images ({FLICKR30K_IMAGES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: the RSS subprocess
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    args.images = args.images or 6000 // scale
    args.reference_batches = args.reference_batches or (2 if args.quick else 8)
    args.rss_images = args.rss_images or FLICKR30K_IMAGES // scale
    return args


def read_captions() -> list[tuple[str, str]]:
    """(image, clean caption) for every line of Flickr8k.token.txt."""
    from captioner.text import normalize

    lines = (FLICKR8K / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    pairs = (line.split("\t", 1) for line in lines)
    return [(key.rsplit("#", 1)[0], normalize(caption)) for key, caption in pairs]


def split_captions(pairs: list[tuple[str, str]], split_file: str, count: int) -> list[list[str]]:
    """The captions of the first `count` images of an official split, image by image."""
    names = (FLICKR8K / split_file).read_text(encoding="utf-8").split()[:count]
    by_image: dict[str, list[str]] = {name: [] for name in names}
    for image, caption in pairs:
        if image in by_image:
            by_image[image].append(caption)
    return list(by_image.values())


def random_features(path: Path, count: int, seed: int) -> np.ndarray:
    """(count, 4096) float32 random features written to a .npy in chunks, opened memory-mapped."""
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, FEATURE_DIM))
    for start in range(0, count, 2048):
        stop = min(start + 2048, count)
        array[start:stop] = rng.random((stop - start, FEATURE_DIM), dtype=np.float32)
    array.flush()
    del array
    return np.load(path, mmap_mode="r", allow_pickle=False)


def train_epoch(features, rows, captions, vocab, batch_size, precision, seed, dev=None) -> tuple:
    """(seconds, dev loss, model) of one epoch of our model and data pipeline, traced beforehand.

    rows (N,) and captions (N lists of ids) for the features; dev = (rows, captions) or None."""
    import keras

    from captioner.config import ModelConfig, TrainConfig
    from captioner.data import make_dataset
    from captioner.models.merge import build_model, compile_model

    keras.utils.set_random_seed(seed)
    model = build_model(FEATURE_DIM, vocab, ModelConfig(), precision=precision)
    compile_model(model, TrainConfig().learning_rate)
    # Trace on a few batches of varied shapes (incl. a partial one) so the epoch never retraces.
    warm = 2 * batch_size + 7
    model.fit(
        make_dataset(features, rows[:warm], captions[:warm], batch_size, True, seed),
        shuffle=False,
        verbose=0,
    )
    dataset = make_dataset(features, rows, captions, batch_size, shuffle=True, seed=seed)
    start = time.perf_counter()
    model.fit(dataset, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    val_loss = None
    if dev is not None:
        dev_data = make_dataset(features, dev[0], dev[1], batch_size, shuffle=False, seed=seed)
        val_loss = float(model.evaluate(dev_data, verbose=0))
    return seconds, val_loss, model


def reference_epoch(
    features,
    image_captions: dict[int, list[str]],
    word_index: dict[str, int],
    max_length: int,
    batches: int,
) -> float:
    """Seconds per epoch of the reference approach: `batches` generator batches timed, scaled."""
    from captioner.reference import build_prefix_model, prefix_batches

    prefix_model = build_prefix_model(FEATURE_DIM, len(word_index) + 1, max_length)
    for inputs, targets in itertools.islice(  # trace: the sample count varies between batches
        prefix_batches(features, image_captions, word_index, max_length), 2
    ):
        prefix_model.train_on_batch(inputs, targets)
    start = time.perf_counter()
    timed = 0
    for inputs, targets in itertools.islice(  # generator time counts: the notebook paid it too
        prefix_batches(features, image_captions, word_index, max_length), batches
    ):
        prefix_model.train_on_batch(inputs, targets)
        timed += 1
    seconds_per_batch = (time.perf_counter() - start) / timed
    return seconds_per_batch * math.ceil(len(image_captions) / IMAGES_PER_BATCH)


def epoch_flops(captions, vocab_size: int) -> float:
    """Matmul FLOPs of one training epoch (forward + 2x for backward) of the merge model."""
    from captioner.config import ModelConfig

    cfg = ModelConfig()
    gates = 4 if cfg.cell == "lstm" else 3
    positions = sum(len(caption) + 1 for caption in captions)  # words + <end>
    per_position = (
        2 * (cfg.embed_dim + cfg.units) * gates * cfg.units  # RNN
        + 2 * cfg.units * cfg.units
        + 2 * cfg.units * vocab_size
    )  # decoder, logits
    per_caption = 2 * FEATURE_DIM * cfg.units  # image branch
    return 3.0 * (positions * per_position + len(captions) * per_caption)


def breakdown(model, dataset, batches: int, epoch_seconds: float) -> dict[str, float]:
    """The epoch's seconds in the output projection + softmax + loss, in the RNN and in the rest.

    On `batches` real batches, a whole training step and each part alone (forward + backward)
    are timed back to back, so a busy machine slows them alike; their shares split the epoch.
    """
    import tensorflow as tf

    from captioner.models import packed_lstm
    from captioner.models.shared import output_cross_entropy

    output, rnn = model.get_layer("logits"), model.get_layer("rnn")
    embed = model.get_layer("embedding").output_dim

    @tf.function(reduce_retracing=True)
    def projection(hidden, labels):  # (N, U), (N,): what MergeModel.train_step runs
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = output_cross_entropy(hidden, output.kernel, output.bias, labels)
        return tape.gradient(loss, [hidden, *output.trainable_weights])

    @tf.function(reduce_retracing=True)
    def recurrent(embedded, mask):  # (B, T, E), (B, T): as MergeModel.train_step runs the RNN
        with tf.GradientTape() as tape:
            tape.watch(embedded)
            if packed_lstm.supports(rnn):  # only the real positions, packed
                packing = packed_lstm.pack(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1))
                packed = tf.gather_nd(embedded, packing.index)
                loss = tf.reduce_sum(packed_lstm.lstm_layer(rnn, packed, packing))
            else:
                loss = tf.reduce_sum(rnn(embedded, mask=mask))
        return tape.gradient(loss, [embedded, *rnn.trainable_weights])

    def step(inputs, targets):
        return [model.train_on_batch(inputs, targets)]

    totals = {"step": 0.0, "projection": 0.0, "rnn": 0.0}
    # repeat: a small dataset (--quick) may hold fewer than batches + 2 batches
    for index, (inputs, targets) in enumerate(dataset.repeat().take(batches + 2)):
        labels = targets[targets != 0]
        hidden = tf.cast(tf.random.normal((int(labels.shape[0]), rnn.units)), output.compute_dtype)
        embedded = tf.random.normal((*targets.shape, embed))
        for name, fn, args in (
            ("step", step, (inputs, targets)),
            ("projection", projection, (hidden, labels)),
            ("rnn", recurrent, (embedded, inputs["tokens"] != 0)),
        ):
            start = time.perf_counter()
            [np.asarray(tensor) for tensor in fn(*args)]
            if index >= 2:  # the first two trace
                totals[name] += time.perf_counter() - start
    parts = {name: epoch_seconds * totals[name] / totals["step"] for name in ("projection", "rnn")}
    return {**parts, "rest": epoch_seconds - sum(parts.values())}


def rss_child(directory: Path, seed: int) -> None:
    """The Flickr30k-sized epoch in its own process: prints {"peak_rss_mb", "seconds"}."""
    from captioner.config import TrainConfig

    features, rows, captions = rss_child_data(directory, seed, FLICKR30K_VOCAB)
    train = TrainConfig()
    seconds, _, _ = train_epoch(
        features, rows, captions, FLICKR30K_VOCAB, train.batch_size, train.precision, seed
    )
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": seconds}))


def rss_30k(images: int, lengths: np.ndarray, seed: int) -> dict[str, float]:
    """Peak RSS (MiB) and seconds of one default epoch on `images` x 5 captions, memmapped."""
    return rss_epoch(__file__, random_features, images, lengths, seed)


def flickr8k_set(images: int) -> SimpleNamespace:
    """Training and dev captions (clean text, feature rows) and the vocabularies compared."""
    from captioner.config import TokenizerConfig
    from captioner.reference import fit_word_index
    from captioner.tokenizer import Vocabulary

    pairs = read_captions()
    train = split_captions(pairs, "Flickr_8k.trainImages.txt", images)
    dev = split_captions(pairs, "Flickr_8k.devImages.txt", max(1, images // 6))
    every = [caption for _, caption in pairs]
    data = SimpleNamespace(
        by_image={row: captions for row, captions in enumerate(train)},
        train=[c for captions in train for c in captions],
        train_rows=np.repeat(np.arange(len(train)), [len(c) for c in train]),
        dev=[c for captions in dev for c in captions],
        dev_rows=len(train) + np.repeat(np.arange(len(dev)), [len(c) for c in dev]),
        word_index=fit_word_index(every),  # every word of the caption file, no min count
        max_length=max(len(c.split()) for c in every) + 2,  # with startseq/endseq
        full=Vocabulary.from_captions(every, min_count=1),  # (a): the reference's words
    )
    data.ours = Vocabulary.from_captions(data.train, min_count=TokenizerConfig().min_count)
    return data


def same_function(features, data: SimpleNamespace, quick: bool, seed: int) -> dict[str, float]:
    """(a): one epoch in float32 with the reference's vocabulary and batches, and its breakdown."""
    from captioner.data import make_dataset

    captions = [data.full.encode(c) for c in data.train]
    batch = 5 * IMAGES_PER_BATCH
    seconds, _, model = train_epoch(
        features, data.train_rows, captions, data.full.size, batch, "float32", seed
    )
    log(f"(a) same function: {seconds:.1f} s per epoch; timing its parts")
    dataset = make_dataset(features, data.train_rows, captions, batch, True, seed)
    parts = breakdown(model, dataset, batches=4 if quick else 20, epoch_seconds=seconds)
    return {
        "ours_same_function_s": seconds,
        **{f"breakdown_{name}_s": value for name, value in parts.items()},
    }


def defaults(features, data: SimpleNamespace, quick: bool, seed: int) -> dict[str, float]:
    """(b): one epoch with our default settings in float32 and bfloat16 (and, unless quick,
    float32 with another seed: the noise of the dev loss); ours_s is the default precision's."""
    from captioner.config import TrainConfig

    train = TrainConfig()
    captions = [data.ours.encode(c) for c in data.train]
    dev = (data.dev_rows, [data.ours.encode(c) for c in data.dev])
    runs = [("float32", seed), ("bfloat16", seed)] + ([] if quick else [("float32", seed + 1)])
    result = {}
    for precision, run_seed in runs:
        setting = (data.ours.size, train.batch_size, precision, run_seed, dev)
        seconds, val_loss, _ = train_epoch(features, data.train_rows, captions, *setting)
        name = precision + ("_seed2" if run_seed != seed else "")
        log(f"(b) defaults, {name}: {seconds:.1f} s per epoch, dev loss {val_loss:.4f}")
        result.update({f"ours_{name}_s": seconds, f"val_loss_{name}": val_loss})
    result["ours_s"] = result[f"ours_{train.precision}_s"]
    return result


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Datasets of unknown length end an epoch by running out, which Keras warns about.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    if args.rss_child:
        rss_child(Path(args.rss_child), args.seed)
        return {}
    from captioner.config import TrainConfig

    data = flickr8k_set(args.images)
    train = TrainConfig()
    size = 2048 if args.quick else 4096  # of the matmul that measures the peak
    peaks = {dtype: matmul_peak_gflops(size, dtype) for dtype in ("float32", "bfloat16")}
    result: dict = {
        "images": len(data.by_image),
        "captions": len(data.train),
        "vocab_reference": len(data.word_index) + 1,
        "vocab_default": data.ours.size,
        "max_length": data.max_length,
        "batch_default": train.batch_size,
        "precision_default": train.precision,
    }
    with tempfile.TemporaryDirectory() as tmp:
        features = random_features(
            Path(tmp) / "features.npy", len(data.by_image) + len(set(data.dev_rows)), args.seed
        )
        result["reference_s"] = reference_epoch(
            features, data.by_image, data.word_index, data.max_length, args.reference_batches
        )
        log(f"reference: {result['reference_s']:.1f} s per epoch")
        result.update(same_function(features, data, args.quick, args.seed))
        result.update(defaults(features, data, args.quick, args.seed))
    result["ratio_same_function"] = result["reference_s"] / result["ours_same_function_s"]
    result["ratio_default"] = result["reference_s"] / result["ours_s"]

    peaks = {
        dtype: max(before, matmul_peak_gflops(size, dtype))  # the best of two: a busy
        for dtype, before in peaks.items()
    }  # machine lowers both the peak and our speed
    result["peak_gflops_float32"], result["peak_gflops_bfloat16"] = peaks.values()
    full = [data.full.encode(c) for c in data.train]
    ours = [data.ours.encode(c) for c in data.train]
    result["floor_s"] = epoch_flops(full, data.full.size) / (peaks["float32"] * 1e9)
    result["floor_default_s"] = epoch_flops(ours, data.ours.size) / (peaks[train.precision] * 1e9)

    log(f"one epoch on {args.rss_images:,} images x 5 captions in a subprocess, for its RSS")
    rss = rss_30k(args.rss_images, np.array([len(c) for c in ours]), args.seed)
    result.update(
        peak_rss_mb_30k=rss["peak_rss_mb"],
        rss_images=args.rss_images,
        rss_epoch_s=rss["seconds"],
        peak_rss_mb_bench=peak_rss_mb(),
        **machine(),
    )
    return report(result, args.json)


if __name__ == "__main__":  # the RSS subprocess (and direct use)
    main(sys.argv[1:])
