"""Caption models behind one decoder interface (decoder.py): merge.py today, others to come."""

from captioner.models.decoder import (
    DECODERS,
    DEFAULT_DECODER,
    Decoder,
    build,
    decoder_for,
    features_of,
    load_saved,
)

__all__ = [
    "DECODERS",
    "DEFAULT_DECODER",
    "Decoder",
    "build",
    "decoder_for",
    "features_of",
    "load_saved",
]
