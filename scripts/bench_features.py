"""`bench.py features`: VGG16 fc2 extraction, ours against the reference loop, same images and run.

Ours is the whole `captioner features` stage (tf.data decoding in parallel, batched compiled
inference, chunked writes) in float32 and in mixed bfloat16; the reference is the notebook's loop
(load_img, preprocess_input, one model.predict per image; captioner.reference). Random weights
(no internet); the encoders are built and traced before the clock starts, as a long run amortises
that. Each is measured --rounds times, interleaved, and the best kept. GFLOP/s are counted from
the model's layers, against the measured float32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import machine, matmul_peak_gflops, report

# CAPTIONER_SHARED: the folder holding fixtures/ (default ../shared), as for the tests.
SHARED = os.environ.get("CAPTIONER_SHARED", Path(__file__).resolve().parents[2] / "shared")
FIXTURES = Path(SHARED, "fixtures", "flickr8k")


def model_flops(model) -> int:
    """Multiply-adds x 2 of the Conv2D and Dense layers: the work of one image."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, channels_in, channels_out = layer.kernel.shape
            _, out_h, out_w, _ = layer.output.shape
            total += 2 * out_h * out_w * kernel_h * kernel_w * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


def make_dataset(folder: Path, count: int, fixtures: Path) -> list[Path]:
    """`count` image files (the fixture photos, tiled via symlinks) and a captions.csv for them."""
    import pandas as pd

    photos = sorted((fixtures / "Flicker8k_Dataset").glob("*.jpg"))
    images = folder / "images"
    images.mkdir(parents=True)
    paths = []
    for index in range(count):
        path = images / f"{index:04d}_{photos[index % len(photos)].name}"
        path.symlink_to(photos[index % len(photos)])
        paths.append(path)
    dataset = folder / "data" / "bench"
    dataset.mkdir(parents=True)
    pd.DataFrame(
        {
            "image": [p.name for p in paths],
            "split": "train",
            "caption": "a photo",
            "raw": "A photo.",
        }
    ).to_csv(dataset / "captions.csv", index=False)
    (dataset / "captions.json").write_text(json.dumps({"images_dir": str(images)}))
    return paths


def time_ours(folder: Path, precision: str, batch_size: int, seed: int) -> tuple[float, np.ndarray]:
    """Images/s of `extract` on the dataset in `folder`, and the features it wrote."""
    from captioner import encoders, features
    from captioner.config import load_config
    from captioner.feature_cache import load_cache

    cfg = load_config(
        None,
        (),
        dataset="bench",
        **{
            "data.data_dir": str(folder / "data"),
            "seed": seed,
            "features.weights": "none",
            "features.precision": precision,
            "features.batch_size": batch_size,
        },
    )
    encoder = encoders.build_encoder("vgg16", "none", precision, seed)  # reused by extract
    warm = sorted((folder / "images").iterdir())[:batch_size]
    encoder.encode_files(warm, batch_size)
    start = time.perf_counter()
    out = features.extract(cfg)
    seconds = time.perf_counter() - start
    cache = load_cache(out)
    result = np.array(cache.features)
    for name in ("features.npy", "ids.txt", "bad_images.txt", "meta.json"):
        (out / name).unlink()  # the next precision computes, not reuses
    return len(cache.ids) / seconds, result


def reference_model(seed: int):
    """The reference's VGG16 fc2 model, with the same random weights as ours (same seed)."""
    import keras

    from captioner import reference

    keras.utils.set_random_seed(seed)
    return reference.reference_vgg16(weights=None)


def time_reference(model, paths: list[Path]) -> tuple[float, np.ndarray]:
    from captioner import reference

    reference.reference_features(model, paths[:1])  # warm up predict
    start = time.perf_counter()
    result = reference.reference_features(model, paths)
    seconds = time.perf_counter() - start
    return len(paths) / seconds, np.concatenate([result[p.name.split(".")[0]] for p in paths])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity."""
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py features", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--images", type=int, default=96, help="images timed (fixtures tiled)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--rounds", type=int, default=2, help="measure each this many times")
    parser.add_argument("--skip-reference", action="store_true", help="ours only (tuning)")
    args = parser.parse_args(argv)
    from captioner import encoders

    peak = ours = ours_bf16 = reference = 0.0
    theirs = None if args.skip_reference else reference_model(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_dataset(Path(tmp), args.images, args.fixtures)
        for _ in range(args.rounds):  # interleaved, best of each: fair under a drifting load
            peak = max(peak, matmul_peak_gflops())
            speed, ours_features = time_ours(Path(tmp), "float32", args.batch_size, seed=0)
            ours = max(ours, speed)
            speed, bf16_features = time_ours(Path(tmp), "bfloat16", args.batch_size, seed=0)
            ours_bf16 = max(ours_bf16, speed)
            if args.skip_reference:
                reference, reference_features = float("nan"), ours_features
            else:
                speed, reference_features = time_reference(theirs, paths)
                reference = max(reference, speed)
        flops = model_flops(encoders.build_encoder("vgg16", "none", "float32", 0).model)
    result = {
        "ours": ours,
        "reference": reference,
        "ratio": ours / reference,
        "peak_gflops": peak,
        "ours_gflops": ours * flops / 1e9,
        "ratio_bf16": ours_bf16 / reference,
        "cosine_bf16": cosine(bf16_features, ours_features),
        "ours_bf16": ours_bf16,
        "gflop_per_image": flops / 1e9,
        "peak_fraction": ours * flops / 1e9 / peak,
        "cosine_reference": cosine(reference_features, ours_features),
        "images": args.images,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        **machine(),
    }
    return report(result, args.json)
