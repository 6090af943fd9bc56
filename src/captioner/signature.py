"""The names a client of a captioner model sees, one set for the exported SavedModel
(export_graph.py) and for `captioner serve` (serving.py), which speaks TensorFlow Serving's REST
protocol: a client of `captioner serve` works unchanged against TF Serving running the export.

    serving_default     image_bytes (B,) string -> caption (B,) string, log_prob (B,) float32
    caption_with_beam   the same plus beam, an int32 scalar (exported models only)

An export of the decoder alone (`captioner export --input features`) takes features (B, ...)
float32, in the shape the run's model takes, instead of image_bytes.

log_prob is the caption's log-probability under the model (likelihood.py), in both.
"""

SIGNATURE = "serving_default"  # the run's beam width
BEAM_SIGNATURE = "caption_with_beam"  # the beam width as an input
IMAGE_INPUT = "image_bytes"
FEATURE_INPUT = "features"  # instead of images: an export of the decoder alone (--input features)
BEAM_INPUT = "beam"
CAPTION, LOG_PROB = "caption", "log_prob"  # the outputs
