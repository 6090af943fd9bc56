"""`bench.py export`: a run exported as SavedModel and TFLite (float32, float16, dynamic): each
file's size, per-image latency, and its captions of the run's test split against `captioner
caption`'s (same run, same settings) and the references (BLEU-4).

    python scripts/bench.py export --run runs/demo [--data-dir data] [--images 100]
                                   [--out DIR] [--rounds 3] [--json]

Latency: one image per call (the median over the images, after a warm-up call), and per image
in calls of 32; the best of --rounds such medians, since the machine may be shared (its load
average is recorded). The SavedModel takes the JPEG bytes; a TFLite model takes the pixels
decoded and resized by Pillow, so its figure excludes that (measured alone: decode_ms). TFLite
runs with 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import machine, report

BATCH = 32


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py export")
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--data-dir", default=None, help="where the run's dataset lives")
    parser.add_argument("--images", type=int, default=100, help="test images used (first N)")
    parser.add_argument("--out", default=None, help="keep the exports here (reused if there)")
    parser.add_argument("--rounds", type=int, default=3, help="latency: best of N medians")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from captioner import captions, evaluate, metrics
    from captioner.config import replace
    from captioner.loaded_run import load_run

    run = load_run(args.run)
    if args.data_dir:
        run.cfg = replace(run.cfg, **{"data.data_dir": args.data_dir})
    references = evaluate.split_references(run, "test")
    names = list(references)[: args.images]
    _, images_dir = captions.load_captions(run.cfg)
    paths = [str(images_dir / name) for name in names]
    load_before = os.getloadavg()
    result: dict = {"machine": machine(), "run": str(args.run), "images": len(paths)}
    greedy, default = run.decode_settings(1), run.decode_settings()
    caption = {
        "greedy": [c for _, c in run.caption_files(paths, greedy)[0]],
        "default": [c for _, c in run.caption_files(paths, default)[0]],
    }
    rounds = args.rounds
    size = run.encoder.size  # the pixels TFLite takes: the run's features.image_size
    result["caption_ms"] = _latency(
        lambda p: run.caption_files(p, default), [[p] for p in paths], rounds
    )
    result["beam"] = default.beam
    variants = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        out = Path(args.out or folder)
        for fmt, quantize in (
            ("saved_model", None),
            ("tflite", None),
            ("tflite", "float16"),
            ("tflite", "dynamic"),
        ):
            name = fmt if quantize is None else f"{fmt}-{quantize}"
            variants[name] = _variant(args.run, out / name, fmt, quantize, paths, rounds, size)
    for variant in variants.values():
        for decoding in ("greedy", "default"):
            ours = variant.pop(f"captions_{decoding}")
            same = sum(a == b for a, b in zip(ours, caption[decoding], strict=True))
            variant[f"same_as_caption_{decoding}"] = same / len(paths)
            if decoding == "greedy":
                refs = [references[n] for n in names]
                variant["bleu4_greedy"] = metrics.bleu(ours, refs)["bleu4"]
    result["variants"] = variants
    result["bleu4_greedy_caption"] = metrics.bleu(
        caption["greedy"], [references[n] for n in names]
    )["bleu4"]
    result["decode_ms"] = _latency(lambda path: _pixels(path, size), paths, rounds)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return report(result, args.json)


def _variant(
    run: str, out: Path, fmt: str, quantize: str | None, paths: list[str], rounds: int, size: int
) -> dict:
    from captioner.export import export

    seconds = None
    if not out.exists():
        start = time.perf_counter()
        export(run, out, fmt=fmt, quantize=quantize)
        seconds = round(time.perf_counter() - start, 1)
    file_bytes = (
        sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        if out.is_dir()
        else out.stat().st_size
    )
    caption = _saved_model(out) if fmt == "saved_model" else _tflite(out)
    inputs = [_bytes(p) if fmt == "saved_model" else _pixels(p, size) for p in paths]
    return {
        "export_s": seconds,
        "size_mb": round(file_bytes / 2**20, 1),
        "captions_greedy": caption(inputs, 1),
        "captions_default": caption(inputs, None),
        "ms_per_image": _latency(lambda batch: caption(batch, None), [[x] for x in inputs], rounds),
        f"ms_per_image_batch{BATCH}": _latency(
            lambda batch: caption(batch, None),
            [inputs[i : i + BATCH] for i in range(0, len(inputs) - BATCH + 1, BATCH)] or [inputs],
            rounds,
            per=BATCH,
        ),
    }


def _saved_model(path: Path):
    import tensorflow as tf

    model = tf.saved_model.load(str(path))

    def caption(images: list[bytes], beam: int | None) -> list[str]:
        data = tf.constant(images)
        if beam is None:
            out = model.signatures["serving_default"](image_bytes=data)
        else:
            out = model.signatures["caption_with_beam"](image_bytes=data, beam=tf.constant(beam))
        return [c.decode() for c in out["caption"].numpy()]

    return caption


def _tflite(path: Path):
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
    default = interpreter.get_signature_runner("serving_default")
    with_beam = interpreter.get_signature_runner("caption_with_beam")

    def caption(pixels: list[np.ndarray], beam: int | None) -> list[str]:
        batch = np.stack(pixels)  # (B, S, S, 3)
        if beam is None:
            out = default(pixels=batch)
        else:
            out = with_beam(pixels=batch, beam=np.array(beam, np.int32))
        return [" ".join(w.decode() for w in row if w) for row in out["words"]]

    return caption


def _bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def _pixels(path: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: decoded and resized by Pillow, as for the training features."""
    from captioner.images import load_image

    return load_image(path, size)


def _latency(call, batches: list, rounds: int, per: int = 1) -> float:
    """Milliseconds per image: the best of `rounds` medians over the batches, each round after
    a warm-up call."""
    medians = []
    for _ in range(rounds):
        call(batches[0])
        times = []
        for batch in batches:
            start = time.perf_counter()
            call(batch)
            times.append((time.perf_counter() - start) / per * 1000)
        medians.append(statistics.median(times))
    return round(min(medians), 1)
