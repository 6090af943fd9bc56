"""The `captioner` commands that take a trained model elsewhere: `export`. cli.py adds them to
the `captioner` group; like every command, they only parse options and call their module."""

from __future__ import annotations

import click

from captioner.cli_options import fail_cleanly, start_tensorflow


@click.command()
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="A finished run directory made by `captioner train`.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["saved_model", "tflite"]),
    default="saved_model",
    show_default=True,
    help="A SavedModel folder (image bytes -> captions) or a .tflite file (pixels -> words).",
)
@click.option(
    "--quantize",
    type=click.Choice(["float16", "dynamic"]),
    default=None,
    help="TFLite only: float16 weights, or int8 weights with dynamic-range quantization.",
)
@click.option(
    "--beam", type=int, default=None, help="Default beam width (1 = greedy; default: the run's)."
)
@click.argument("out", type=click.Path())
@fail_cleanly
def export(run_dir: str, fmt: str, quantize: str | None, beam: int | None, out: str) -> None:
    """Write a run as a SavedModel or TFLite model that needs no captioner to run.

    The SavedModel's serving_default signature takes image file bytes and returns captions
    and their log-probabilities (README, "Use your model elsewhere").

    \b
    Example:
      captioner export --run runs/demo exported/demo
      captioner export --run runs/demo --format tflite --quantize float16 demo.tflite
    """
    start_tensorflow()
    from captioner import export as stage

    click.echo(stage.export(run_dir, out, fmt=fmt, beam=beam, quantize=quantize))
