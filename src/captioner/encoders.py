"""Image encoders: the registered networks (encoder_specs.py) built with keras.applications, and
the decode -> preprocess -> infer pipeline around them.

An encoder gives each image either one vector (layout "pooled": VGG16's fc2, the others' global
average pool) or its last convolutional map (layout "grid", (H, W, C): VGG16's block5_conv3,
14x14x512 at 224 pixels as in Show, Attend and Tell; the others' last block, 7x7xC), optionally
average-pooled to a smaller grid (grid_size) and at another input size (image_size).

Images are decoded as images.py does it (the reference's keras.utils.load_img, pixel for pixel),
in Pillow inside a parallel tf.data map (Pillow releases the GIL while decoding); batches feed one
compiled inference function, and unreadable files are reported as (path, reason) instead of
stopping the run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioner.encoder_specs import ENCODERS, EncoderSpec
from captioner.errors import CaptionerError
from captioner.images import BadImage, load_image
from captioner.tfdata import without_autotuner

ENCODER_CACHE = 4  # encoders kept built (build_encoder): one each for a few runs side by side


def resolve_precision(precision: str) -> str:
    """Resolve "auto": bfloat16 where the hardware runs it fast (AMX/AVX512-BF16 CPU, GPU sm80+),
    else float32. Explicit float32 / bfloat16 pass through."""
    if precision in ("float32", "bfloat16"):
        return precision
    if precision != "auto":
        raise CaptionerError(
            f"features.precision: unknown value '{precision}'; use auto, float32 or bfloat16"
        )
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return "bfloat16" if capability and capability >= (8, 0) else "float32"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()  # oneDNN capped, e.g. at AVX2
    if isa not in ("", "ALL", "DEFAULT") and not any(k in isa for k in ("BF16", "AMX", "AVX10")):
        return "float32"  # below the bfloat16 instructions: bfloat16 would be emulated, slower
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


class Encoder:
    """A built network plus the decode -> preprocess -> infer pipeline around it.

    row_shape: what one image gives, (D,) pooled or (H, W, C) grid; dim = D or C."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: keras.Model,
        weights: str,
        precision: str,
        seed: int,
        layout: str = "pooled",
    ) -> None:
        self.spec, self.model, self.layout = spec, model, layout
        self.name, self.size = spec.name, int(model.input_shape[1])
        self.row_shape = tuple(int(n) for n in model.output_shape[1:])
        self.dim = self.row_shape[-1]
        self.grid = self.row_shape[:2] if layout == "grid" else None
        self.weights, self.precision, self.seed = weights, precision, seed
        self._preprocess = getattr(keras.applications, spec.module).preprocess_input
        # One trace for every batch size (the last batch of a chunk is often shorter).
        signature = [tf.TensorSpec((None, self.size, self.size, 3), tf.uint8)]
        self._infer = tf.function(self.forward, input_signature=signature)

    def describe(self) -> dict:
        """What a cache of this encoder's rows says of their shape (meta.json)."""
        shape = {"dim": self.dim, "layout": self.layout, "input_size": [self.size, self.size]}
        return shape | ({"grid": list(self.grid)} if self.grid else {})

    def forward(self, images: tf.Tensor) -> tf.Tensor:
        """(B, S, S, 3) uint8 -> (B, *row_shape) float32 features, whatever the compute dtype:
        preprocess_input, then the network. Graph ops: export_graph.py traces it too."""
        pixels = self._preprocess(tf.cast(images, tf.float32))
        return tf.cast(self.model(pixels, training=False), tf.float32)

    def encode_images(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Decoded images (N, size, size, 3) uint8 (decode_image's) -> features (N, *row_shape)
        float32, `batch_size` images per inference call as encode_files runs them."""
        parts = [np.zeros((0, *self.row_shape), np.float32)]
        for start in range(0, len(images), batch_size):
            parts.append(self._infer(tf.constant(images[start : start + batch_size])).numpy())
        return np.concatenate(parts)

    def _dataset(self, groups: Sequence[Sequence[str]], batch_size: int) -> tf.data.Dataset:
        """Batches of (images (B, H, W, 3) uint8, reasons (B,) string; b"" = decoded fine).

        Batches never span two groups, so a group is batched the same way whatever is around it
        (a resumed chunk gives bit-identical features). Without tf.data's autotuner, whose
        sleeping thread could hold the end of an extraction ~29 s after 53 s of batches
        (tfdata.py, BENCHMARKS.md)."""
        size = self.size

        def decode(path: bytes) -> tuple[np.ndarray, bytes]:
            try:
                return load_image(path.decode(), size), b""
            except BadImage as error:
                return np.zeros((size, size, 3), np.uint8), str(error).encode()

        def decode_op(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            image, reason = tf.numpy_function(decode, [path], [tf.uint8, tf.string], stateful=False)
            return tf.ensure_shape(image, (size, size, 3)), tf.ensure_shape(reason, ())

        paths = tf.constant([str(path) for group in groups for path in group] or [""])
        lengths = np.array([len(group) for group in groups], np.int64)
        starts = tf.constant(np.cumsum(lengths) - lengths, tf.int64)
        ends = tf.constant(np.cumsum(lengths), tf.int64)

        def group_batches(index: tf.Tensor) -> tf.data.Dataset:
            return (
                tf.data.Dataset.from_tensor_slices(paths[starts[index] : ends[index]])
                .map(decode_op, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .batch(batch_size)
            )

        batches = tf.data.Dataset.range(len(groups)).flat_map(group_batches)
        return without_autotuner(batches.prefetch(tf.data.AUTOTUNE))

    def encode_groups(
        self, groups: Sequence[Sequence[str]], batch_size: int = 16
    ) -> Iterator[tuple[int, np.ndarray, list[str], list[tuple[str, str]]]]:
        """Per batch: (group index, features (n_ok, *row_shape) float32, ok paths,
        [(path, reason)])."""
        order = [(index, path) for index, group in enumerate(groups) for path in group]
        done = 0
        for images, reasons in self._dataset(groups, batch_size):
            features = self._infer(images).numpy()  # (B, ...); failed images' rows dropped
            batch = order[done : done + len(features)]
            done += len(features)
            reasons = [reason.decode() for reason in reasons.numpy()]
            ok = [i for i, reason in enumerate(reasons) if not reason]
            yield (
                batch[0][0],
                features[ok],
                [batch[i][1] for i in ok],
                [
                    (path, reason)
                    for (_, path), reason in zip(batch, reasons, strict=True)
                    if reason
                ],
            )

    def encode_files(
        self, paths: Sequence[str | Path], batch_size: int = 16
    ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """(features (n_ok, *row_shape) float32, ok paths, [(path, reason)]) for image files."""
        parts, ok_paths, failures = [np.zeros((0, *self.row_shape), np.float32)], [], []
        for _, features, ok, failed in self.encode_groups([[str(p) for p in paths]], batch_size):
            parts.append(features)
            ok_paths += ok
            failures += failed
        return np.concatenate(parts), ok_paths, failures


def _build_network(
    spec: EncoderSpec, weights: str | None, layout: str, size: int, grid_size: int
) -> keras.Model:
    application = getattr(keras.applications, spec.application)
    shape = (size, size, 3)
    if layout == "grid":
        trunk = application(weights=weights, include_top=False, input_shape=shape)
        grid = trunk.get_layer(spec.grid_layer).output if spec.grid_layer else trunk.output
        native = int(grid.shape[1])
        if grid_size and native % grid_size:
            raise CaptionerError(
                f"features.grid_size: {grid_size} does not divide {spec.name}'s {native}x{native} "
                f"grid at {size} pixels; use a divisor of {native}, or 0 for {native}x{native}"
            )
        if grid_size and grid_size != native:  # the mean of each block of regions
            grid = keras.layers.AveragePooling2D(native // grid_size, name="grid_pool")(grid)
        return keras.Model(trunk.inputs, grid, name=f"{spec.name}_grid")
    if spec.output == "avg":
        return application(weights=weights, include_top=False, pooling="avg", input_shape=shape)
    network = application(weights=weights, input_shape=shape)
    return keras.Model(network.inputs, network.get_layer(spec.output).output, name=spec.name)


def build_encoder(
    name: str,
    weights: str,
    precision: str = "auto",
    seed: int = 0,
    layout: str = "pooled",
    grid_size: int = 0,
    image_size: int = 0,
) -> Encoder:
    """Encoder `name` with weights "imagenet" (fetched by Keras once), "none" (random, seeded by
    `seed`) or a local .h5 / .weights.h5 file; precision auto | float32 | bfloat16; layout
    "pooled" (a vector per image) or "grid" (its last convolutional map, average-pooled to
    grid_size x grid_size when given); image_size pixels square (0 = the encoder's own).

    Building takes seconds, so the last ENCODER_CACHE encoders built are kept and returned
    again: the one encoder cache, so runs made with the same encoder share one copy of it."""
    if name not in ENCODERS:
        raise CaptionerError(
            f"features.encoder: unknown encoder '{name}'; choose one of {', '.join(ENCODERS)}"
        )
    spec = ENCODERS[name]
    size = image_size or spec.size
    if layout == "pooled" and spec.output != "avg" and size != spec.size and weights != "none":
        # the first dense layer's weights are made for the trunk's output at spec.size
        raise CaptionerError(
            f"features.image_size: {name}'s trained {spec.output} needs {spec.size}x{spec.size} "
            f"images, not {size}; cache its grid instead (features.layout=grid: a merge model "
            "takes the grid's mean), or use random weights (--weights none)"
        )
    stamp = None
    if weights not in ("imagenet", "none"):
        weights = str(Path(weights).expanduser().resolve())
        if not Path(weights).is_file():
            raise CaptionerError(
                f"{weights}: weights file not found; pass --weights imagenet, "
                "none, or an existing .h5 file"
            )
        stamp = Path(weights).stat().st_mtime_ns  # a rewritten file is a new encoder
    shape = (layout, grid_size if layout == "grid" else 0, size)
    return _build(name, weights, resolve_precision(precision), seed, stamp, shape)


@functools.lru_cache(maxsize=ENCODER_CACHE)
def _build(
    name: str,
    weights: str,
    precision: str,
    seed: int,
    stamp: int | None,
    shape: tuple[str, int, int],
) -> Encoder:
    spec = ENCODERS[name]
    layout, grid_size, size = shape
    # the network's weights file: a grid is cut from the trunk, which has its own (smaller) file
    url = spec.trunk_url if layout == "grid" and spec.trunk_url else spec.weights_url
    keras.utils.set_random_seed(seed)  # the "none" weights are a function of the seed
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        model = _build_network(
            spec, None if weights == "none" else weights, layout, size, grid_size
        )
    except CaptionerError:
        raise
    except Exception as error:  # Keras raises bare Exception for failed downloads
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if weights == "imagenet":
            raise CaptionerError(
                f"{name}: could not download the ImageNet weights ({reason}); download "
                f"{url} yourself and pass --weights PATH"
            ) from None
        if weights == "none":
            raise CaptionerError(f"{name}: cannot be built ({reason})") from None
        raise CaptionerError(
            f"{weights}: not {name} weights ({reason}); pass the Keras file "
            f"{url.rsplit('/', 1)[-1]}"
        ) from None
    finally:
        keras.config.set_dtype_policy(previous)
    return Encoder(spec, model, weights, precision, seed, layout)
