"""Image decoding: an image file (or its bytes) -> (size, size, 3) uint8 RGB pixels, as every
encoder takes them (encoders.py), for the feature stage, `captioner caption` and the server alike.

Decoding reproduces the reference approach's `keras.utils.load_img(path, target_size=(224, 224))`
exactly (Pillow: open, convert to RGB, resize with NEAREST), so a feature computed from these
pixels equals the reference's for the same weights. Only regular files up to MAX_IMAGE_BYTES are
read, and a file that cannot be decoded raises BadImage with a one-line reason, which callers
report per file instead of stopping the run. Pillow and NumPy only: no TensorFlow.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Only regular files up to this size are read as images (README, "Safety"): larger than any
# photo Pillow would decode within its pixel limit, small enough that a few at once fit in memory.
MAX_IMAGE_BYTES = 256 << 20
NOT_REGULAR = "not a regular file (a FIFO, device or folder); only image files are read"
# Pillow only warns between 1x and 2x its pixel limit (and refuses above): load_image refuses
# both and reports it as one line, so the warning itself would be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(Exception):
    """A file that cannot be turned into an RGB image; the message is the reason."""


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES; else BadImage.

    A FIFO would block the read forever and /dev/zero never ends, so the file type is checked
    before opening (stat follows symlinks) and again on the opened file (O_NONBLOCK: opening a
    FIFO swapped in meanwhile does not wait for a writer), and the read stops past the cap.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadImage(NOT_REGULAR)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BadImage(NOT_REGULAR)
            data = handle.read(min(info.st_size, MAX_IMAGE_BYTES) + 1)
    except FileNotFoundError:
        raise BadImage("missing: no such file") from None
    except OSError as error:
        raise BadImage(f"unreadable: {error.strerror or error}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(
            f"too large: over {MAX_IMAGE_BYTES >> 20} MiB (captioner.images.MAX_IMAGE_BYTES)"
        )
    if not data:
        raise BadImage("empty file (0 bytes)")
    return data


def load_image(path: str | Path, size: int = 224) -> np.ndarray:
    """(size, size, 3) uint8 RGB, pixel-identical to keras.utils.load_img(target_size=(size, size)).

    Like load_img: no EXIF rotation, alpha dropped, NEAREST resize. Unlike it, 16-bit images are
    scaled to 8 bits (Pillow's convert would clip them to white). Raises BadImage.
    """
    return decode_image(read_image_file(path), size)


def decode_image(data: bytes, size: int = 224) -> np.ndarray:
    """load_image for the bytes of an image file (an upload, say): (size, size, 3) uint8 RGB,
    the same pixels as load_image gives for a file holding these bytes. Raises BadImage."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    too_large = BadImage(
        f"too large: over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels; "
        "resize it or raise PIL.Image.MAX_IMAGE_PIXELS"
    )
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
            raise too_large
        image.load()
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"cannot decode ({str(error).splitlines()[0]})") from None
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: keep the top 8 bits.
        pixels = np.asarray(image).astype(np.uint32) >> 8
        image = Image.fromarray(np.minimum(pixels, 255).astype(np.uint8), "L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.NEAREST)
    return np.asarray(image, dtype=np.uint8)
