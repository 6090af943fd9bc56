"""What every `captioner` command shares: the config options, resolving them into a Config,
turning a CaptionerError into one line on stderr, and a quiet TensorFlow start."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from captioner.config import Config, load_config
from captioner.errors import CaptionerError

VERBOSE_ENV = "CAPTIONER_VERBOSE"  # set by `captioner --verbose`: TensorFlow's start-up is shown


def start_tensorflow() -> None:
    """Import TensorFlow and probe its devices with the process's stderr muted, unless
    --verbose: its native start-up lines (absl's "All log messages before absl::InitializeLog",
    oneDNN notes, "Could not find cuda drivers", "failed call to cuInit") are written below
    Python, so TF_CPP_MIN_LOG_LEVEL does not stop them, and on a machine without a GPU they are
    noise. A failure still raises, after stderr is restored."""
    if os.environ.get(VERBOSE_ENV):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # the CUDA probe: its lines come now
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def fail_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a CaptionerError (or a file-system error) into one line on stderr and exit 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CaptionerError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(f"{where}{error.strerror or error}") from None
        except KeyboardInterrupt:
            click.echo(
                "interrupted; finished work is kept, run the command again to resume", err=True
            )
            sys.exit(130)

    return wrapper


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --set, --dataset, --data-dir, --seed: shared by every data-touching command."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            help="TOML file on top of the defaults (default: configs/<dataset>.toml).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Override one setting, e.g. --set train.epochs=5 (repeatable).",
        ),
        click.option("--dataset", help="flickr8k, flickr30k, demo, or a name of your own."),
        click.option("--data-dir", help="Root of the data layout (default ./data)."),
        click.option("--seed", type=int, help="The one random seed (default 0)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def resolve(
    config_path: str | None,
    overrides: tuple[str, ...],
    dataset: str | None,
    data_dir: str | None,
    seed: int | None,
    **flags: Any,
) -> Config:
    return load_config(
        config_path,
        overrides,
        dataset=dataset,
        **{"data.data_dir": data_dir, "seed": seed},
        **flags,
    )


# --run RUN_DIR: the one trained run a command works on (evaluate, serve).
run_option = click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="A run directory made by `captioner train`.",
)
