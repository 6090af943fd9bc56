"""`bench.py quality`: caption quality on real photographs, ours against the reference approach.

Data, all real: the Flickr8k captions and official split (the fixtures' Flickr8k.token.txt through
`captioner clean`) and ImageNet features of the real photographs (shared/real-flickr8k: MobileNet
v1, the pooled 1024-d embedding; only the train and dev images are there, the test features are
held back). Everything is trained on train and measured on dev.

- reference: the notebook's approach (REFERENCE.md): every training word kept (no <unk>; words
  unseen in training are dropped from dev captions, as keras' Tokenizer dropped them), its model
  and sizes, Adam 1e-3, batches of the captions of 32 images in file order, trained on whole
  captions (the same function as its per-prefix generator, tests/test_model.py), stopped at the
  first epoch whose dev loss does not improve (best epoch kept); greedy decoding.
- ours: `captioner train` with every default (config.py, configs/flickr8k.toml) on a feature cache
  of the same features, then decoding with the run's own settings, as `captioner evaluate` does.

For each: BLEU-1..4, CIDEr-D, ROUGE-L; mean caption length and the references' mean; the share
of captions that reach the length cap; distinct words used; the mean probability of <end> at the
true end of dev captions (teacher forcing); best dev loss and its epoch; training seconds.

    python scripts/bench.py quality [--set train.epochs=5 ...] [--features grid-mean] [--json]

`--set` changes our settings (the README's table of what was tried); `--images N` trains on the
first N training images only (the test suite's small version). `--features grid --decoders merge
attention` compares the decoders like for like on the shared 7x7x128 grid: attention on the
grid, merge on its mean over regions (one row each: ours-merge, ours-attention).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from bench_common import machine, report

from captioner.io import log, read_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAPTIONER_SHARED", ROOT.parent / "shared"))
ENCODER = "mobilenet-v1"  # the cache folder's name under features/
REFERENCE_IMAGES_PER_BATCH = 32


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--images", type=int, default=0, help="first N train images (0 = all)")
    parser.add_argument("--dev-images", type=int, default=0, help="first N dev images (0 = all)")
    parser.add_argument(
        "--features",
        choices=("pooled", "grid", "grid-mean"),
        default="pooled",
        help="the shared pooled vectors, or the shared grid (grid-mean: its old name), which "
        "merge and the reference take as the mean over its regions and attention as it is",
    )
    parser.add_argument(
        "--decoders",
        nargs="+",
        choices=("merge", "attention"),
        help="train ours with each of these decoders on the same features (default: "
        "model.decoder); attention needs --features grid",
    )
    parser.add_argument(
        "--quantized",
        action="store_true",
        help="also convert each of our decoders alone to TFLite, float32 and dynamic-range "
        "int8 (as `captioner export --quantize dynamic`), and compare their dev captions",
    )
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-epochs", type=int, default=20)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared/ folder")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    from captioner.config import replace

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        cfg = prepare_dataset(Path(tmp), args)
        result = {"machine": machine(), "features": args.features, "set": args.overrides}
        if not args.skip_reference:
            result["reference"] = run_reference(cfg, args.reference_epochs)
        decoders = args.decoders or [cfg.model.decoder]
        for decoder in decoders:
            key = "ours" if len(decoders) == 1 else f"ours-{decoder}"
            ours = replace(cfg, **{"model.decoder": decoder, "train.name": key})
            result[key] = run_ours(ours, args.quantized)
    if not args.json:
        print_table(result)
    return report(result, args.json) if args.json else result


# --- the data: real captions and features in a temporary data folder ---------------------------


def prepare_dataset(tmp: Path, args: argparse.Namespace):
    """A data folder with captions.csv (official split) and a feature cache of the real features."""
    import pandas as pd

    from captioner import clean
    from captioner.config import load_config

    fixtures = args.shared / "fixtures" / "flickr8k" / "Flickr8k_text"
    features_dir = (
        args.shared / "real-flickr8k" / ("pooled" if args.features == "pooled" else "grid")
    )
    for needed in (fixtures / "Flickr8k.token.txt", features_dir / "features.npy"):
        if not needed.is_file():
            raise SystemExit(f"{needed}: not found; pass --shared DIR or set CAPTIONER_SHARED")
    flags = {
        "data.data_dir": str(tmp / "data"),
        "train.runs_dir": str(tmp / "runs"),
        "features.encoder": ENCODER,
    }
    cfg = load_config(None, args.overrides, dataset="flickr8k", **flags)
    cfg.raw_dir.mkdir(parents=True)
    (cfg.raw_dir / "Flickr8k_text").symlink_to(fixtures.resolve())
    clean.clean(cfg)
    shutil.rmtree(cfg.raw_dir)  # from here on captions.csv is reused as it is
    frame = pd.read_csv(cfg.captions_csv, dtype=str, keep_default_na=False)
    keep = set()
    for split, count in (("train", args.images), ("dev", args.dev_images)):
        images = list(dict.fromkeys(frame.loc[frame["split"] == split, "image"]))
        keep |= set(images[:count] if count else images)
    frame[frame["image"].isin(keep)].to_csv(cfg.captions_csv, index=False)
    write_cache(features_dir, cfg.features_dir, args.features)
    return cfg


def write_cache(source: Path, out: Path, kind: str) -> None:
    """A finished feature cache (data/README.md) of the shared features, written by captioner's
    own cache writer: pooled (N, D) or grid (N, H, W, C) as they are (a merge model takes a
    grid as the mean over its regions: feature_cache.for_decoder)."""
    from captioner.feature_cache import write_cache as write_feature_cache

    features = np.load(source / "features.npy", mmap_mode="r")
    ids = (source / "ids.txt").read_text(encoding="utf-8").split()
    meta = {"encoder": ENCODER, "weights": "imagenet", "dim": int(features.shape[-1])}
    if kind != "pooled":
        meta |= {"layout": "grid", "grid": [int(n) for n in features.shape[1:3]]}
    out.mkdir(parents=True)
    write_feature_cache(out, [(features, ids, [])], {**meta, "dtype": str(features.dtype)})


def dev_features(cfg, decoder: str):
    """(the feature cache, the dev references by image, the dev images' features (N, ...) in
    the shape `decoder` takes them, in the references' order)."""
    from captioner.feature_cache import load_cache
    from captioner.models import features_of

    cache = load_cache(cfg.features_dir)
    references = dev_references(cfg)
    rows = [cache.row[image] for image in references]
    return cache, references, cache.rows(rows, features_of(decoder), decoder)


def dev_references(cfg) -> dict[str, list[str]]:
    from captioner.captions import read_split, references

    return references(read_split(cfg, "dev"))


# --- the two contestants ----------------------------------------------------------------------


def run_ours(cfg, quantized: bool = False) -> dict:
    """`captioner train` with the defaults, then the run's own decoding settings (and with
    `quantized`, the decoder as TFLite: tflite_agreement)."""
    from captioner.loaded_run import load_run
    from captioner.train import train

    start = time.perf_counter()
    run_dir = train(cfg)
    seconds = time.perf_counter() - start
    run = load_run(run_dir, with_encoder=False)
    state = read_json(run_dir / "state.json")
    settings = run.decode_settings().to_dict()
    result = measure(cfg, run.model, run.vocab.encode, run.vocab, settings, cfg.model.decoder)
    if quantized:
        result["tflite"] = tflite_agreement(cfg, run_dir, settings["beam"])
    return {
        **result,
        "decoding": settings,
        "vocabulary": run.vocab.size,
        "best_val_loss": state["best_val_loss"],
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "train_s": seconds,
    }


def run_reference(cfg, max_epochs: int) -> dict:
    """The notebook's model and training on the same captions and features."""
    import keras

    from captioner import data
    from captioner.captions import read_split
    from captioner.config import ModelConfig
    from captioner.feature_cache import load_cache
    from captioner.models.merge import build_model, compile_model
    from captioner.text import UNK_ID
    from captioner.tokenizer import Vocabulary

    keras.utils.set_random_seed(cfg.seed)
    train_frame = read_split(cfg, "train")
    vocab = Vocabulary.from_captions(train_frame["caption"], min_count=1)  # every word

    def encode(caption: str) -> list[int]:  # keras' Tokenizer: unknown words are dropped
        return [i for i in vocab.encode(caption) if i != UNK_ID]

    cache = load_cache(cfg.features_dir)
    rows = np.array([cache.row[image] for image in train_frame["image"]])
    captions = [encode(caption) for caption in train_frame["caption"]]
    dev_frame = read_split(cfg, "dev")
    dev_rows = np.array([cache.row[image] for image in dev_frame["image"]])
    dev_captions = [encode(caption) for caption in dev_frame["caption"]]
    batch = 5 * REFERENCE_IMAGES_PER_BATCH  # the captions of 32 images, in file order
    train_data = data.make_dataset(cache.features, rows, captions, batch, shuffle=False, seed=0)
    dev_data = data.make_dataset(cache.features, dev_rows, dev_captions, 256, False, 0, bucket=True)
    sizes = ModelConfig(embed_dim=256, units=256, dropout=0.4, normalize_features=False)
    model = build_model(cache.meta["dim"], vocab.size, sizes)  # a grid: its mean over regions
    compile_model(model, 1e-3)
    stop = keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
    start = time.perf_counter()
    with warnings.catch_warnings():  # no known batch count: an epoch ends when the data does
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = model.fit(
            train_data, validation_data=dev_data, epochs=max_epochs, callbacks=[stop], verbose=2
        ).history
    seconds = time.perf_counter() - start
    settings = {"beam": 1, "length_penalty": 0.0, "no_repeat_ngram": 0}
    result = measure(cfg, model, encode, vocab, {**settings, "max_length": vocab.max_length})
    best = int(np.argmin(history["val_loss"]))
    return {
        **result,
        "vocabulary": vocab.size,
        "best_val_loss": float(history["val_loss"][best]),
        "best_epoch": best + 1,
        "epochs": len(history["val_loss"]),
        "train_s": seconds,
    }


# --- the measurements -------------------------------------------------------------------------


def measure(cfg, model, encode, vocab, settings: dict, decoder: str = "merge") -> dict:
    """Scores and length statistics of the dev captions `model` (a `decoder`) writes, and
    P(<end>)."""
    from captioner import decode, metrics

    cache, references, features = dev_features(cfg, decoder)
    images = list(references)
    ids = decode.decode(model, features, **settings)
    hypotheses = [vocab.decode(words) for words in ids]
    refs = [references[image] for image in images]
    scores, _ = metrics.score_all(hypotheses, refs, with_meteor=False)
    lengths = np.array([len(h.split()) for h in hypotheses])
    return {
        **scores,
        "mean_length": float(lengths.mean()),
        "reference_length": float(np.mean([len(r.split()) for rs in refs for r in rs])),
        "at_cap": float(np.mean([len(words) >= settings["max_length"] for words in ids])),
        "distinct_words": len({w for h in hypotheses for w in h.split()}),
        "p_end": end_probability(model, cache, references, encode, decoder),
        "examples": [
            f"{image}: {caption}" for image, caption in zip(images[:3], hypotheses[:3], strict=True)
        ],
    }


def tflite_agreement(cfg, run_dir: Path, beam: int, chunk: int = 100) -> dict:
    """The run's decoder alone (`captioner export --input features`: the real features come
    without an encoder) as TFLite, float32 and dynamic-range int8. For greedy decoding and the
    run's own settings: the share of the int8 model's dev captions equal to float32's, and each
    one's scores; `beam`: the run's own beam width."""
    import tensorflow as tf

    from captioner import metrics
    from captioner.export import export

    _, references, features = dev_features(cfg, cfg.model.decoder)
    features = features.astype(np.float32)
    refs = list(references.values())
    captions: dict[str, dict[str, list[str]]] = {}
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-tflite-") as folder:
        for quantize in (None, "dynamic"):
            name = quantize or "float32"
            path = export(
                run_dir, Path(folder) / name, "tflite", quantize=quantize, inputs="features"
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
                interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
            runner = interpreter.get_signature_runner("caption_with_beam")
            captions[name] = {}
            for decoding, width in (("greedy", 1), ("default", beam)):
                rows = []
                for start in range(0, len(features), chunk):
                    batch = features[start : start + chunk]
                    out = runner(features=batch, beam=np.array(width, np.int32))
                    rows += [" ".join(w.decode() for w in row if w) for row in out["words"]]
                captions[name][decoding] = rows
                scores = metrics.score_all(rows, refs, with_meteor=False)[0]
                result[f"{name}_{decoding}"] = {key: scores[key] for key in ("bleu4", "cider_d")}
            result[f"{name}_mb"] = round(path.stat().st_size / 2**20, 2)
    for decoding in ("greedy", "default"):
        pairs = zip(captions["dynamic"][decoding], captions["float32"][decoding], strict=True)
        result[f"agree_{decoding}"] = float(np.mean([a == b for a, b in pairs]))
    return result


def end_probability(model, cache, references: dict[str, list[str]], encode, decoder) -> float:
    """Mean softmax probability of <end> where each dev caption really ends (teacher forcing)."""
    import tensorflow as tf

    from captioner.data import make_dataset
    from captioner.models import features_of
    from captioner.text import END_ID

    rows = [cache.row[image] for image, captions in references.items() for _ in captions]
    captions = [encode(caption) for captions in references.values() for caption in captions]
    shape = {"takes": features_of(decoder), "decoder": decoder}
    dataset = make_dataset(cache.features, rows, captions, 256, shuffle=False, seed=0, **shape)
    probabilities = []
    for inputs, targets in dataset:
        logits = model(inputs, training=False)  # (B, T, V)
        at_end = tf.where(targets == END_ID)  # (n, 2): one per caption
        probabilities.append(tf.nn.softmax(tf.gather_nd(logits, at_end))[:, END_ID].numpy())
    return float(np.concatenate(probabilities).mean())


SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l")  # named as evaluate does
EXTRA = {
    "mean_length": "length",
    "at_cap": "at cap",
    "distinct_words": "words",
    "p_end": "P(end)",
    "best_val_loss": "dev loss",
    "best_epoch": "epoch",
    "train_s": "train s",
}


def print_table(result: dict) -> None:
    """A Markdown table, one row per contestant, as BENCHMARKS.md records it."""
    from captioner.evaluate import LABELS

    columns = {**{key: LABELS[key] for key in SCORES}, **EXTRA}
    rows = [name for name in result if name == "reference" or name.startswith("ours")]
    print("| | " + " | ".join(columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in rows:
        values = result[name]
        cells = [
            f"{values[key]:.3f}" if isinstance(values[key], float) else str(values[key])
            for key in columns
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name in rows:
        print(f"{name}: references' mean length {result[name]['reference_length']:.2f}")
        for example in result[name]["examples"]:
            print(f"  {example}")
    log(f"machine: {result['machine']}")
