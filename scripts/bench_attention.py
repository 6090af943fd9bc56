"""`bench.py attention`: the attention decoder's training epoch against the merge model's, where
its time goes, its decoding speed, and the peak memory of a Flickr30k-sized epoch.

    python scripts/bench.py attention [--json] [--quick] [--grids 7 14] [--rss-images N]

Data: Flickr8k-sized, as `bench.py train`: the 6,000 official training images with their 5 real
captions each (real vocabulary, words seen >= 5 times, and real lengths, from the fixtures'
Flickr8k.token.txt), and random grid features in a memory-mapped float16 .npy, as a grid cache
holds them: 7x7x512 (VGG16 at 224 px pooled 2x2, or a 7x7 encoder) and 14x14x512 (VGG16's
block5_conv3, Show-Attend-Tell's choice).

- epoch_*: one epoch of each decoder with the default settings (config.py), through
  data.make_dataset and Model.fit, traced beforehand: merge on the grid's mean over regions
  (512-d: one extraction serves both, like for like), attention on the grid. Wall seconds and
  this process's CPU seconds (steadier than wall time on a shared machine); the ratio is
  attention / merge, measured back to back in the same run.
- breakdown_*: the attention epoch's seconds in the attention LSTM's steps (forward + backward:
  the scores, the context, the gates), in the output projection + softmax + loss, and the rest
  (embedding, deep output, initial state, the region projection, the optimizer), from the CPU
  time of each part alone on real batches, scaled to the epoch.
- decode_*: ms per caption for 1,000 images, greedy and beam 3, through decode.py, with random
  weights and <end> pushed down so every caption runs to max_length 34 (the worst case, as
  `bench.py decode` does), vocabulary 8,000; attention on the grid and, in the same run, merge
  on its mean. Wall and CPU milliseconds.
- peak_rss_mb_30k: peak RSS of one attention epoch on 31,783 images x 5 captions of 7x7x512
  float16 (1.6 GB, memory-mapped), in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from bench_common import machine, peak_rss_mb, report, rss_child_data, rss_epoch
from bench_train import FLICKR30K_IMAGES, FLICKR30K_VOCAB, flickr8k_set

from captioner.io import log

CHANNELS = 512


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--quick", action="store_true", help="a tenth of the data (smoke test)")
    parser.add_argument("--images", type=int, help="training images (default 6000)")
    parser.add_argument("--grids", type=int, nargs="+", default=[7, 14], help="grid sides")
    parser.add_argument("--rss-images", type=int, help=f"RSS run's images ({FLICKR30K_IMAGES})")
    parser.add_argument("--decode-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: the RSS subprocess
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    args.images = args.images or 6000 // scale
    args.rss_images = args.rss_images or FLICKR30K_IMAGES // scale
    return args


def grid_features(path: Path, count: int, side: int, seed: int) -> np.ndarray:
    """(count, side, side, 512) float16 random features written in chunks, opened memory-mapped."""
    rng = np.random.default_rng(seed)
    shape = (count, side, side, CHANNELS)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    for start in range(0, count, 512):
        stop = min(start + 512, count)
        array[start:stop] = rng.random((stop - start, side, side, CHANNELS), dtype=np.float32)
    array.flush()
    del array
    return np.load(path, mmap_mode="r", allow_pickle=False)


def build(decoder: str, side: int, vocab_size: int):
    """A compiled model of `decoder` with the default settings, for a side x side grid."""
    from captioner import models
    from captioner.config import load_config

    cfg = load_config(None, (f"model.decoder={decoder}",), dataset="bench")
    meta = {"dim": CHANNELS, "grid": [side, side], "layout": "grid"}
    return models.build(cfg, meta, vocab_size)


def dataset(decoder: str, features, rows, captions, seed: int):
    from captioner import models
    from captioner.config import TrainConfig
    from captioner.data import make_dataset

    takes = models.features_of(decoder)
    batch = TrainConfig().batch_size
    return make_dataset(features, rows, captions, batch, True, seed, takes=takes, decoder=decoder)


def epoch(decoder: str, features, rows, captions, vocab_size: int, seed: int) -> tuple:
    """(wall s, CPU s, model) of one default epoch, traced beforehand on varied shapes."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build(decoder, features.shape[1], vocab_size)
    warm = 2 * 64 + 7
    model.fit(dataset(decoder, features, rows[:warm], captions[:warm], seed), verbose=0)
    data = dataset(decoder, features, rows, captions, seed)
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(data, verbose=0)
    return time.perf_counter() - wall, time.process_time() - cpu, model


def breakdown(model, data, batches: int, epoch_cpu: float) -> dict[str, float]:
    """The attention epoch's CPU seconds in its LSTM steps, its output projection and the rest.

    On `batches` real batches, a whole training step and each part alone (forward + backward)
    are timed back to back in CPU time; their shares split the epoch's.
    """
    import tensorflow as tf

    from captioner.models.shared import output_cross_entropy

    output, cell = model.get_layer("logits"), model.get_layer("attention_lstm")
    embed, units = model.get_layer("embedding").output_dim, cell.units

    @tf.function(reduce_retracing=True)
    def projection(hidden, labels):  # (N, E), (N,): what the training step runs
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = output_cross_entropy(hidden, output.kernel, output.bias, labels)
        return tape.gradient(loss, [hidden, *output.trainable_weights])

    @tf.function(reduce_retracing=True)
    def recurrent(embedded, regions, tokens):  # (B, T, E), (B, L, C), (B, T)
        batch = tf.shape(embedded)[0]
        zeros = tf.zeros([batch, units])
        with tf.GradientTape() as tape:
            tape.watch(embedded)
            hidden, context, _ = cell(embedded, regions, zeros, zeros, tokens)
            loss = tf.reduce_sum(hidden) + tf.reduce_sum(context)
        return tape.gradient(loss, [embedded, *cell.trainable_weights])

    def step(inputs, targets):
        return [model.train_on_batch(inputs, targets)]

    totals = {"step": 0.0, "projection": 0.0, "attention_lstm": 0.0}
    for index, (inputs, targets) in enumerate(data.repeat().take(batches + 2)):
        labels = targets[targets != 0]
        hidden = tf.cast(tf.random.normal((int(labels.shape[0]), embed)), output.compute_dtype)
        embedded = tf.random.normal((*targets.shape, embed))
        features = inputs["features"]
        regions = tf.reshape(features, (features.shape[0], -1, features.shape[-1]))
        for name, fn, call in (
            ("step", step, (inputs, targets)),
            ("projection", projection, (hidden, labels)),
            ("attention_lstm", recurrent, (embedded, regions, inputs["tokens"])),
        ):
            start = time.process_time()
            [np.asarray(tf.convert_to_tensor(t)) for t in fn(*call) if t is not None]
            if index >= 2:  # the first two trace
                totals[name] += time.process_time() - start
    parts = {k: epoch_cpu * totals[k] / totals["step"] for k in ("attention_lstm", "projection")}
    return {**parts, "rest": epoch_cpu - sum(parts.values())}


def decoding(side: int, images: int, seed: int) -> dict[str, float]:
    """ms per caption (wall and CPU), greedy and beam 3, of random attention and merge models
    (merge on the grid's mean, as for training); every caption 34 words."""
    import keras

    from captioner import decode
    from captioner.feature_cache import for_decoder
    from captioner.text import END_ID

    grid = np.random.default_rng(seed).random((images, side, side, CHANNELS), np.float32)
    result = {}
    for decoder in ("attention", "merge"):
        keras.utils.set_random_seed(seed)
        model = build(decoder, side, 8000)
        kernel, bias = model.get_layer("logits").get_weights()
        bias[END_ID] = -1e4  # full-length captions: the worst case
        model.get_layer("logits").set_weights([kernel, bias])
        features = grid if decoder == "attention" else for_decoder(grid, "pooled", decoder)
        for name, beam in (("greedy", 1), ("beam3", 3)):
            decode.decode(model, features[:8], 34, beam=beam)  # trace
            wall, cpu = time.perf_counter(), time.process_time()
            ids = decode.decode(model, features, 34, beam=beam)
            tag = f"{decoder}_{name}_{side}x{side}"
            result[f"decode_{tag}_ms"] = (time.perf_counter() - wall) / images * 1000
            result[f"decode_{tag}_cpu_ms"] = (time.process_time() - cpu) / images * 1000
            assert all(len(words) == 34 for words in ids)
    return result


def rss_child(directory: Path, seed: int) -> None:
    """The Flickr30k-sized attention epoch in its own process: prints peak RSS and seconds."""
    features, rows, captions = rss_child_data(directory, seed, FLICKR30K_VOCAB)
    wall, _, _ = epoch("attention", features, rows, captions, FLICKR30K_VOCAB, seed)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": wall}))


def rss_30k(images: int, lengths: np.ndarray, seed: int) -> dict[str, float]:
    """Peak RSS (MiB) and seconds of one attention epoch on `images` x 5 captions, 7x7x512."""
    found = rss_epoch(
        __file__,
        lambda path, count, seed: grid_features(path, count, 7, seed),
        images,
        lengths,
        seed,
    )
    return {"peak_rss_mb_30k": found["peak_rss_mb"], "epoch_s_30k": found["seconds"]}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    if args.rss_child:
        rss_child(Path(args.rss_child), args.seed)
        return {}
    data = flickr8k_set(args.images)
    captions = [data.ours.encode(c) for c in data.train]
    result: dict = {
        "machine": machine(),
        "images": args.images,
        "captions": len(captions),
        "vocab": data.ours.size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.grids:
            tag = f"{side}x{side}"
            features = grid_features(Path(tmp) / f"{tag}.npy", len(data.by_image), side, args.seed)
            for decoder in ("merge", "attention"):
                wall, cpu, model = epoch(
                    decoder, features, data.train_rows, captions, data.ours.size, args.seed
                )
                log(f"{tag}: {decoder} epoch {wall:.1f} s ({cpu:.1f} CPU s)")
                result |= {f"epoch_{decoder}_s_{tag}": wall, f"epoch_{decoder}_cpu_s_{tag}": cpu}
            result[f"ratio_{tag}"] = (
                result[f"epoch_attention_s_{tag}"] / result[f"epoch_merge_s_{tag}"]
            )
            result[f"ratio_cpu_{tag}"] = (
                result[f"epoch_attention_cpu_s_{tag}"] / result[f"epoch_merge_cpu_s_{tag}"]
            )
            parts = breakdown(
                model,
                dataset("attention", features, data.train_rows, captions, args.seed),
                batches=4 if args.quick else 20,
                epoch_cpu=result[f"epoch_attention_cpu_s_{tag}"],
            )
            result |= {f"breakdown_{name}_cpu_s_{tag}": value for name, value in parts.items()}
            result |= decoding(side, args.decode_images, args.seed)
            del features
    lengths = np.array([len(c) for c in captions])
    result |= rss_30k(args.rss_images, lengths, args.seed)
    report(result, args.json)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
