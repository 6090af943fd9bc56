"""What `captioner serve` serves, without the web layer: a run loaded once, each request's
instances checked and turned into arrays, batches captioned, and the shapes of TensorFlow
Serving's REST predict protocol (serve.py puts them behind HTTP).

Requests (TF Serving's row and columnar formats):

    {"instances": [I, ...]}
        -> {"predictions": [{"caption": str, "log_prob": float}, ...]}
    {"inputs": [I, ...]} or {"inputs": {"image_bytes": [I, ...]}}
        -> {"outputs": {"caption": [str, ...], "log_prob": [float, ...]}}

An instance I is an image file's bytes, {"b64": "<base64>"} or {"image_bytes": {"b64": ...}}
(JPEG, PNG, ...: whatever Pillow reads), decoded exactly as `captioner caption` reads a file; or
the image's features, a list of numbers in the shape the run's model takes (D numbers for the
merge model) or {"features": [...]}. A run trained on dropped-in features has no encoder to turn
an image into features, so it takes features only. "signature_name", if given, must be
"serving_default". The names are the exported SavedModel's (signature.py): input "image_bytes",
outputs "caption" and "log_prob" (likelihood.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.images import BadImage, decode_image
from captioner.io import log, read_json
from captioner.loaded_run import DecodeSettings, LoadedRun, load_run
from captioner.signature import CAPTION, IMAGE_INPUT, LOG_PROB, SIGNATURE

OUTPUTS = (CAPTION, LOG_PROB)
VERSION = "1"  # TF Serving numbers a model's versions; a run is served as its only version
MAX_INSTANCES = 64  # per request: bounds the memory one request takes (64 decoded images ~10 MB)
URLSAFE = str.maketrans("-_", "+/")  # TF Serving reads web-safe base64 too
# Images per encoder call. A batch of 32 costs MobileNetV3 20% less per image in one call than
# in two of 16 (features.batch_size, which `captioner caption` uses), with the same features;
# the cap bounds the activations a large encoder holds when --max-batch is set higher (VGG16
# at 224 px: about 1 GB in bfloat16 for 64 images).
ENCODER_CHUNK = 64
STEP = 8  # batches are padded to 1, 2, 4, 8, 16, 24, 32, ... rows (bucket)


@dataclass(frozen=True)
class Instance:
    """One checked instance: decoded pixels (size, size, 3) uint8, or features in the shape the
    model takes, float32."""

    kind: str  # "image" | "features"
    array: np.ndarray


class ServedModel:
    """A run, loaded once, with the decoding settings every request is captioned with."""

    def __init__(self, run: LoadedRun, decoding: DecodeSettings, name: str) -> None:
        from captioner.likelihood import feature_shape

        self.run, self.decoding, self.name = run, decoding, name
        self.feature_shape = feature_shape(run.model)  # (D,) for the merge model

    @classmethod
    def load(cls, run_dir: str | Path, beam: int | None = None, name: str = "") -> ServedModel:
        """The run with its encoder when its features came from a registered one; a run trained
        on dropped-in features is loaded without (it takes features only)."""
        from captioner.encoders import ENCODERS

        run_dir = Path(run_dir)
        meta_path = run_dir / "features_meta.json"
        meta = read_json(meta_path) if meta_path.is_file() else {}
        registered = isinstance(meta, dict) and meta.get("encoder") in ENCODERS
        run = load_run(run_dir, with_encoder=registered)
        if not registered:
            log(
                f"{run_dir}: features from '{run.features_meta.get('encoder')}', which captioner "
                "cannot compute from an image: serving feature vectors only"
            )
        return cls(run, run.decode_settings(beam), name or run.name)

    # --- instances: checked in the request's thread, before they join a batch ---------------

    def instance(self, value: Any, where: str) -> Instance:
        """One JSON instance -> Instance; CaptionerError naming `where` and the problem."""
        if isinstance(value, dict) and len(value) == 1:
            (key, inner), *_ = value.items()
            if key == "b64":
                return self.image(_b64decode(inner, f"{where}.b64"), where)
            if key == IMAGE_INPUT and isinstance(inner, dict):
                return self.instance(inner, f"{where}.{IMAGE_INPUT}")
            if key == "features":
                return self.features(inner, f"{where}.features")
        if isinstance(value, list):
            return self.features(value, where)
        raise CaptionerError(
            f'{where}: expected {{"b64": "<base64 of an image file>"}} or the image\'s features '
            f"(a list of numbers, shape {list(self.feature_shape)})"
        )

    def image(self, data: bytes, where: str) -> Instance:
        """An image file's bytes -> its pixels, as `captioner caption` decodes a file."""
        encoder = self.run.encoder
        if encoder is None:
            raise CaptionerError(
                f"{where}: this run's features came from '{self.run.features_meta.get('encoder')}'"
                ", which captioner cannot compute from an image; send the image's features "
                f"(shape {list(self.feature_shape)}) instead"
            )
        try:
            return Instance("image", decode_image(data, encoder.size))
        except BadImage as error:
            raise CaptionerError(f"{where}: {error}") from None

    def features(self, value: Any, where: str) -> Instance:
        """Nested lists of numbers in the model's feature shape, all finite -> float32 array."""
        try:
            array = np.asarray(value)
        except ValueError:  # ragged lists
            array = np.asarray([])
        if array.dtype.kind not in "iuf" or array.shape != self.feature_shape:
            raise CaptionerError(
                f"{where}: features must be numbers in shape {list(self.feature_shape)}, got "
                + (f"shape {list(array.shape)}" if array.dtype.kind in "iuf" else "other values")
            )
        if not np.isfinite(array).all():
            raise CaptionerError(f"{where}: features must be finite (no NaN or infinity)")
        return Instance("features", array.astype(np.float32))

    # --- batches: on the one thread that runs TensorFlow --------------------------------------

    def caption(self, instances: Sequence[Instance]) -> list[tuple[str, float]]:
        """(caption, log-probability) per instance.

        Every new batch size costs the decoding loop a compile (0.2 s here, seconds under XLA)
        and the encoder new oneDNN kernels, so batches are padded (with copies of their own
        rows, which end when they do) to one of a few sizes (bucket), compiled once by warm_up;
        the encoder's in chunks of at most ENCODER_CHUNK images (see there)."""
        from captioner import decode, likelihood

        features = np.zeros((len(instances), *self.feature_shape), np.float32)  # (N, D)
        images = [row for row, instance in enumerate(instances) if instance.kind == "image"]
        if images:
            pixels = np.stack([instances[row].array for row in images])  # (n, size, size, 3)
            features[images] = self._encode(pixels)
        for row, instance in enumerate(instances):
            if instance.kind == "features":
                features[row] = instance.array
        model, settings = self.run.model, self.decoding
        ids = decode.decode(model, padded(features, bucket(len(features))), **settings.to_dict())
        ids = ids[: len(features)]
        log_probs = likelihood.log_probabilities(model, features, ids, settings.max_length)
        return [
            (self.run.vocab.decode(words), float(log_prob))
            for words, log_prob in zip(ids, log_probs, strict=True)
        ]

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, *feature_shape) features, in padded chunks of at
        most ENCODER_CHUNK, shaped for the decoder as `captioner caption` does
        (feature_cache.for_decoder: a merge model on a grid takes its mean over the regions)."""
        from captioner.feature_cache import for_decoder
        from captioner.models import features_of

        parts = []
        for start in range(0, len(pixels), ENCODER_CHUNK):
            chunk = pixels[start : start + ENCODER_CHUNK]
            size = min(bucket(len(chunk)), ENCODER_CHUNK)
            parts.append(self.run.encoder.encode_images(padded(chunk, size), size)[: len(chunk)])
        decoder = self.run.cfg.model.decoder
        return for_decoder(np.concatenate(parts), features_of(decoder), decoder)

    def warm_up(self, max_batch: int = 1) -> None:
        """Trace and compile the encoder, the decoding loop and the scorer now, for every
        batch size `caption` uses up to max_batch, not on the requests that first need them."""
        if self.run.encoder is not None:
            size = self.run.encoder.size
            blank = Instance("image", np.zeros((size, size, 3), np.uint8))
        else:
            blank = Instance("features", np.zeros(self.feature_shape, np.float32))
        for size in sorted({bucket(n) for n in range(1, max_batch + 1)}):
            self.caption([blank] * size)

    # --- TensorFlow Serving's JSON ------------------------------------------------------------

    def parse_predict(self, body: bytes) -> tuple[list[Instance], bool]:
        """A predict request's body -> (instances, columnar: it used "inputs", not "instances")."""
        if not body.strip():
            raise CaptionerError('empty request body; send {"instances": [{"b64": "..."}]}')
        try:
            request = json.loads(body)
        except ValueError as error:  # JSONDecodeError, or bytes that are no UTF-8/16/32
            raise CaptionerError(f"malformed JSON: {error}") from None
        if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
            raise CaptionerError(
                'the request must be a JSON object with "instances" (or "inputs"), '
                'e.g. {"instances": [{"b64": "..."}]}'
            )
        signature = request.get("signature_name", SIGNATURE)
        if signature != SIGNATURE:
            raise CaptionerError(f"signature_name {signature!r}: the only one is '{SIGNATURE}'")
        where = "instances" if "instances" in request else "inputs"
        values = request[where]
        if where == "inputs" and isinstance(values, dict) and len(values) == 1:
            (name, values), *_ = values.items()
            where = f"inputs.{name}"
            if name not in (IMAGE_INPUT, "features"):
                raise CaptionerError(f"{where}: unknown input; the input is '{IMAGE_INPUT}'")
        if not isinstance(values, list) or not values:
            raise CaptionerError(f"{where} must be a non-empty list")
        if len(values) > MAX_INSTANCES:
            raise CaptionerError(
                f"{where}: {len(values)} instances; send at most {MAX_INSTANCES} per request"
            )
        return [self.instance(value, f"{where}[{i}]") for i, value in enumerate(values)], (
            where != "instances"
        )

    def status(self) -> dict:
        """GET /v1/models/<name>: TF Serving's model status."""
        return {
            "model_version_status": [
                {
                    "version": VERSION,
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def metadata(self) -> dict:
        """GET /v1/models/<name>/metadata: TF Serving's signature description."""

        def tensor(dtype: str, dims: Sequence[int]) -> dict:
            shape = {
                "dim": [{"size": str(size), "name": ""} for size in dims],
                "unknown_rank": False,
            }
            return {"dtype": dtype, "tensor_shape": shape, "name": ""}

        signature = {
            "inputs": {IMAGE_INPUT: tensor("DT_STRING", [-1])},
            "outputs": {CAPTION: tensor("DT_STRING", [-1]), LOG_PROB: tensor("DT_FLOAT", [-1])},
            "method_name": "tensorflow/serving/predict",
        }
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": VERSION},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
        }


def predict_response(results: Sequence[tuple[str, float]], columnar: bool) -> dict:
    """TF Serving's answer: one object per instance (row format) or one list per output."""
    if columnar:
        return {"outputs": {name: [r[i] for r in results] for i, name in enumerate(OUTPUTS)}}
    return {"predictions": [dict(zip(OUTPUTS, result, strict=True)) for result in results]}


def bucket(size: int) -> int:
    """The batch size a batch of `size` rows is padded to: the next power of two up to STEP,
    past it the next multiple of STEP (powers of two would pad a batch of 33 to 64)."""
    return 1 << (size - 1).bit_length() if size <= STEP else -(-size // STEP) * STEP


def padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` (n, ...) followed by copies of its own rows, cycled, up to `size` rows."""
    return rows[np.arange(size) % len(rows)] if size > len(rows) else rows


def _b64decode(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise CaptionerError(f"{where}: must be a base64 string")
    try:
        return base64.b64decode(text.translate(URLSAFE), validate=True)
    except (binascii.Error, ValueError):
        raise CaptionerError(f"{where}: not valid base64") from None
