"""`captioner export`: a trained run as one self-contained file for use without captioner.

    saved_model  a folder: TensorFlow SavedModel, image file bytes -> captions (export_graph.py),
                 for tf.saved_model.load or TF Serving
    tflite       one .tflite file: pixels read as for training (S x S, the encoder's input:
                 features.image_size) -> words, TFLite's own ops only; optionally quantized
                 (float16 weights, or dynamic-range int8)

Both hold the encoder with its weights (pooled or grid, as the run's features were made), the
decoder (any of models/decoder.py's), the decoding loop and the vocabulary. With inputs
"features" they hold the decoder alone and take features (B, ...) float32 in the shape the run's
model takes, for a run trained on dropped-in features (which has no encoder to put in front,
and is otherwise refused) or for an app that runs its encoder elsewhere. The output is
written beside OUT under a temporary name and renamed when complete, so OUT is either absent or
whole; an existing OUT is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError
from captioner.io import log, read_json
from captioner.runs import read_run

FORMATS = ("saved_model", "tflite")
QUANTIZATIONS = ("float16", "dynamic")
INPUTS = ("image", "features")


def export(
    run_dir: str | Path,
    out: str | Path,
    fmt: str = "saved_model",
    beam: int | None = None,
    quantize: str | None = None,
    inputs: str = "image",
) -> Path:
    """Write run_dir's model to `out` in `fmt`, decoding with beam width `beam` by default (None:
    the run's decode.beam), taking `inputs` (images, or features for the decoder alone); return
    `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise CaptionerError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    if quantize is not None and (fmt != "tflite" or quantize not in QUANTIZATIONS):
        raise CaptionerError(
            f"--quantize {quantize}: only for --format tflite, one of {', '.join(QUANTIZATIONS)}"
        )
    if inputs not in INPUTS:
        raise CaptionerError(f"--input {inputs}: unknown; use one of {', '.join(INPUTS)}")
    if out.exists():
        raise CaptionerError(f"{out}: exists; delete it or choose another output path")
    with_encoder = inputs == "image"
    check_exportable(run_dir, with_encoder)
    graph = caption_graph(run_dir, fmt, beam, with_encoder)
    if fmt == "saved_model":
        _publish(out, lambda partial: _write_saved_model(graph, partial))
    else:
        _publish(out, lambda partial: partial.write_bytes(_tflite_bytes(graph, quantize)))
    decoding = ", ".join(f"{key} {value}" for key, value in graph.settings.to_dict().items())
    what = "" if with_encoder else f", the decoder alone (input: features {graph.feature_shape})"
    quantized = f" ({quantize})" if quantize else ""
    log(f"exported {run_dir} as {fmt}{quantized}{what}; decoding: {decoding}")
    return out


def check_exportable(run_dir: Path, with_encoder: bool = True) -> None:
    """A finished run, whose features came from a registered encoder if it is exported
    `with_encoder`; else one line."""
    if not run_dir.is_dir():
        raise CaptionerError(f"{run_dir}: no such run directory; see `captioner runs`")
    summary = read_run(run_dir)
    if summary.status == "broken":
        raise CaptionerError(f"{run_dir}: not a usable run ({summary.problem})")
    if not summary.finished:
        raise CaptionerError(
            f"{run_dir}: training not finished ({summary.epoch}/{summary.epochs} epochs); "
            f"finish it with `captioner train --dataset {summary.dataset or '...'} "
            f"--name {run_dir.name} --resume`, then export"
        )
    if not with_encoder:
        return
    from captioner.encoders import ENCODERS

    meta_path = run_dir / "features_meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    encoder, weights = meta.get("encoder"), meta.get("weights")
    # captioner records "imagenet", "none" or a weights file's absolute path (if that file is
    # gone, building the encoder says so)
    known_weights = isinstance(weights, str) and (
        weights in ("imagenet", "none") or Path(weights).is_absolute()
    )
    if encoder not in ENCODERS or not known_weights:
        raise CaptionerError(
            f"{meta_path}: trained on dropped-in features (encoder {encoder!r}, weights "
            f"{weights!r}), not from a registered encoder ({', '.join(ENCODERS)}): it cannot be "
            "exported with its encoder; --input features exports the decoder alone"
        )


def caption_graph(
    run_dir: Path, fmt: str, beam: int | None = None, with_encoder: bool = True
) -> Any:
    """The run's export_graph.CaptionGraph for `fmt` (without an encoder: the decoder alone):
    for a SavedModel with the encoder and decoder as they made the training features and
    captions (bfloat16 where they were), for TFLite in float32 (no bfloat16 kernels there)."""
    from captioner.export_graph import CaptionGraph
    from captioner.loaded_run import load_run

    if fmt == "saved_model":
        run = load_run(run_dir, with_encoder)
        model = run.model
    else:  # its own copy of the model: made float32
        run = load_run(run_dir, with_encoder, precision="float32")
        if with_encoder and run.features_meta.get("precision") == "bfloat16":
            log(f"{run_dir}: features were made in bfloat16; TFLite computes in float32")
        model = _in_float32(run.model)
    return CaptionGraph(run.encoder, model, run.vocab.tokens, run.decode_settings(beam))


def _publish(out: Path, write: Any) -> None:
    """Call write(partial path) for a temporary path beside `out`, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) / out.name
    try:
        write(partial)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial.parent, ignore_errors=True)


def _write_saved_model(graph: Any, path: Path, signatures: dict | None = None) -> None:
    """The graph's functions as a SavedModel with those signatures (default: the SavedModel's).
    Keras' ExportArchive keeps the weights the functions use; tracking the models as well
    (archive.track) would store every weight twice."""
    import warnings

    import keras

    from captioner.decode import MASK_WARNING

    archive = keras.export.ExportArchive()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", MASK_WARNING)
        for name, function in (signatures or graph.saved_model_signatures()).items():
            function.get_concrete_function()  # traced now: ExportArchive takes traced functions
            archive.add_endpoint(name, function)
        archive.write_out(str(path), verbose=False)


def _tflite_bytes(graph: Any, quantize: str | None) -> bytes:
    """The TFLite model of graph.tflite_signatures(), through a temporary SavedModel."""
    with tempfile.TemporaryDirectory(prefix="captioner-tflite-") as folder:
        source = tflite_source(graph, Path(folder) / "model")
        if quantize == "float16":
            _check_float16(graph)
        return convert_tflite(source, quantize)


def tflite_source(graph: Any, path: Path) -> Path:
    """Write the SavedModel a TFLite model is converted from (pixels or features in, words out);
    one source can be converted several ways (convert_tflite)."""
    _write_saved_model(graph, path, graph.tflite_signatures())
    return path


def convert_tflite(source: Path, quantize: str | None = None) -> bytes:
    """A SavedModel of tflite_source as TFLite, with TFLite's own ops only (the converter fails
    on any other), float32 or quantized: "float16" stores the weights as float16, "dynamic"
    the large ones as int8 (dynamic-range quantization: int8 matrix products)."""
    import tensorflow as tf

    from captioner.signature import BEAM_SIGNATURE, SIGNATURE

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(source), signature_keys=[SIGNATURE, BEAM_SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: dynamic range
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def _check_float16(graph: Any) -> None:
    """Warn about weights float16 cannot hold: a variable whose typical nonzero value is below
    float16's smallest normal number loses its precision or becomes 0 (an encoder with random
    weights gives features near 1e-10, and the decoder's feature statistics follow)."""
    import numpy as np

    smallest = float(np.finfo(np.float16).tiny)  # 6.1e-05
    encoder_weights = graph.encoder.model.weights if graph.encoder is not None else []
    for variable in encoder_weights + graph.model.weights:
        values = np.abs(np.asarray(variable.numpy(), np.float64)).ravel()
        values = values[values > 0]
        if values.size and np.median(values) < smallest:
            log(
                f"float16 cannot hold {variable.path} (median |value| {np.median(values):.1e}, "
                f"below float16's {smallest:.1e}): captions will differ from float32's; "
                "export without --quantize or with --quantize dynamic"
            )


def _in_float32(model: Any) -> Any:
    """model with every layer computing in float32 (its weights are float32 already)."""
    layers = [model]
    while layers:
        layer = layers.pop()
        if layer.dtype_policy.name != "float32":
            layer.dtype_policy = "float32"
        layers += getattr(layer, "layers", [])
    return model
