"""The registered image encoders: which keras.applications network each is, where its image
vector and its grid are, where its weights come from. Plain data without TensorFlow, so the
config can name feature caches after them (Config.features_dir); encoders.py builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class EncoderSpec:
    """One keras.applications network cut where its image vector (or grid) is."""

    name: str
    application: str  # constructor in keras.applications
    module: str  # keras.applications submodule holding its preprocess_input
    output: str  # a layer name of the full network (e.g. "fc2"), or "avg" = pooled trunk
    dim: int
    weights_url: str  # where Keras fetches the ImageNet weights (for the offline hint)
    size: int = 224
    grid_layer: str = ""  # the grid: this layer of the trunk (no top); "" = the trunk's output
    trunk_url: str = ""  # the trunk's weights file, when `output` needs the full network's


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            "vgg16",
            "VGG16",
            "vgg16",
            "fc2",
            4096,
            KERAS_WEIGHTS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
            grid_layer="block5_conv3",  # before the last max-pool: 14x14 at 224 pixels
            trunk_url=KERAS_WEIGHTS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        EncoderSpec(
            "resnet50",
            "ResNet50",
            "resnet50",
            "avg",
            2048,
            KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        EncoderSpec(
            "efficientnetb0",
            "EfficientNetB0",
            "efficientnet",
            "avg",
            1280,
            "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        ),
        # Small and fast (~0.1 GFLOP per image): quick experiments and tests.
        EncoderSpec(
            "mobilenetv3small",
            "MobileNetV3Small",
            "mobilenet_v3",
            "avg",
            576,
            KERAS_WEIGHTS + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        ),
    )
}
