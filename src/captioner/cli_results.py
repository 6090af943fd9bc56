"""The `captioner` commands that look at results: `runs` (list them), `plot` and `app` (the
web page). cli.py adds them to the `captioner` group; like every
command, they only parse options and call their module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from captioner.cli_options import (
    config_options,
    fail_cleanly,
    resolve,
    start_tensorflow,
)
from captioner.runs import SORT_COLUMNS


@click.command()
@click.option("--runs-dir", default="runs", show_default=True, help="Where the runs are.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--sort",
    default="name",
    show_default=True,
    type=click.Choice(list(SORT_COLUMNS)),
    help="Sort by this column (scores best first, others ascending).",
)
@fail_cleanly
def runs(runs_dir: str, as_json: bool, sort: str) -> None:
    """List the runs side by side: settings, epochs, best dev loss, every evaluation's scores.

    Broken or unfinished runs are listed as such; folders that are no runs are left out.

    \b
    Example:
      captioner runs --sort bleu4
      captioner runs --runs-dir runs --json
    """
    from captioner import runs as stage

    summaries = stage.list_runs(Path(runs_dir), sort=sort)
    if as_json:
        click.echo(stage.format_json(summaries))
    elif summaries:
        click.echo(stage.format_table(summaries))
    else:
        click.echo(f"no runs in {runs_dir}; train one with `captioner train`", err=True)


@click.command()
@config_options
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Also plot this run's loss curves, generated captions and (attention) maps.",
)
@click.option(
    "--out",
    "out_dir",
    default="plots",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the PNG files.",
)
@fail_cleanly
def plot(run_dir: str | None, out_dir: str, **common: Any) -> None:
    """Draw PNGs: sample captions, word counts, feature clusters, loss, generated captions,
    and for an attention run where each word of test captions looked.

    Needs the optional extra: pip install 'captioner[plots]'.

    \b
    Example:
      captioner plot --dataset flickr8k --out plots/
      captioner plot --dataset demo --run runs/demo --out plots/
    """
    cfg = resolve(**common)
    if run_dir:
        start_tensorflow()  # an attention run's page decodes test images
    from captioner import plots as stage

    for path in stage.plot(cfg, Path(out_dir), Path(run_dir) if run_dir else None):
        click.echo(path)


@click.command()
@click.option(
    "--model",
    "runs",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False),
    help="Run directory (repeatable: models are shown side by side).",
)
@click.option(
    "--examples",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of example images (default: the first run's test images).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@fail_cleanly
def app(runs: tuple[str, ...], examples: str | None, host: str, port: int) -> None:
    """Start the web page: upload an image, compare the captions of several models.

    Needs the optional extra: pip install 'captioner[app]'.

    \b
    Example:
      captioner app --model runs/flickr30k --model runs/flickr8k
    """
    from captioner import app as page

    sys.exit(
        page.launch(
            [Path(r) for r in runs], Path(examples) if examples else None, host=host, port=port
        )
    )
