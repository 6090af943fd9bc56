"""The `captioner` commands that take a trained model elsewhere: `export` (a SavedModel or
TFLite file) and `serve` (the HTTP service). cli.py adds them to
the `captioner` group; like every command, they only parse options and call their module."""

from __future__ import annotations

from pathlib import Path

import click

from captioner.cli_options import fail_cleanly, run_option, start_tensorflow
from captioner.export import FORMATS, INPUTS, QUANTIZATIONS  # no TensorFlow at import


@click.command()
@run_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="saved_model",
    show_default=True,
    help="A SavedModel folder (image bytes -> captions) or a .tflite file (pixels -> words).",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    default=None,
    help="TFLite only: float16 weights, or int8 weights with dynamic-range quantization.",
)
@click.option(
    "--beam", type=int, default=None, help="Default beam width (1 = greedy; default: the run's)."
)
@click.option(
    "--input",
    "inputs",
    type=click.Choice(INPUTS),
    default="image",
    show_default=True,
    help="features: the decoder alone, taking the features your own encoder computes.",
)
@click.argument("out", type=click.Path())
@fail_cleanly
def export(
    run_dir: str, fmt: str, quantize: str | None, beam: int | None, inputs: str, out: str
) -> None:
    """Write a run as a SavedModel or TFLite model that needs no captioner to run.

    The SavedModel's serving_default signature takes image file bytes and returns captions
    and their log-probabilities (README, "Use your model elsewhere"). With --input features
    it holds the decoder alone and takes features instead: the only export of a run trained
    on dropped-in features.

    \b
    Example:
      captioner export --run runs/demo exported/demo
      captioner export --run runs/demo --format tflite --quantize float16 demo.tflite
      captioner export --run runs/mine --input features --format tflite decoder.tflite
    """
    start_tensorflow()
    from captioner import export as stage

    click.echo(stage.export(run_dir, out, fmt=fmt, beam=beam, quantize=quantize, inputs=inputs))


@click.command()
@run_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8501, show_default=True, help="0 = any free."
)
@click.option("--name", default="", help="Model name in the URLs (default: the run's name).")
@click.option("--beam", type=int, default=None, help="Beam width (1 = greedy; default: the run's).")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Images captioned together at most (1 = no batching).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0, 10_000),
    default=5.0,
    show_default=True,
    help="How long a batch waits for more requests once the first arrived.",
)
@click.option(
    "--max-request-mb",
    type=click.FloatRange(0.001, 4096),
    default=32.0,
    show_default=True,
    help="Larger request bodies get a 413.",
)
@fail_cleanly
def serve(
    run_dir: str,
    host: str,
    port: int,
    name: str,
    beam: int | None,
    max_batch: int,
    max_wait_ms: float,
    max_request_mb: float,
) -> None:
    """Serve a trained run over HTTP: TensorFlow Serving's REST API, with dynamic batching.

    Needs the optional extra: pip install 'captioner[serve]'. README, "Use your model elsewhere".

    \b
    Example:
      captioner serve --run runs/demo --port 8501
      curl -F image=@photo.jpg http://127.0.0.1:8501/caption
    """
    start_tensorflow()
    from captioner import serve as service

    service.serve(
        Path(run_dir),
        host=host,
        port=port,
        name=name,
        beam=beam,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_request_mb=max_request_mb,
    )
