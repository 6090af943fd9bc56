"""captioner: train image-captioning models end to end and caption new images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("captioner")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
