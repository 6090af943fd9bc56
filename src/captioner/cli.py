"""The `captioner` command: one thin click command per stage.

Commands only turn options into a Config and call the stage function. TensorFlow is imported
inside the stage modules, which are imported inside the command bodies once the Config is built,
so `--help` is instant and a bad setting is refused at once, before TensorFlow's start-up logs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from captioner import __version__, cli_deploy, cli_results
from captioner.cli_options import (
    VERBOSE_ENV,
    config_options,
    fail_cleanly,
    resolve,
    run_option,
    start_tensorflow,
)
from captioner.limits import LIMITS

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) is noise on stderr for a CLI.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="captioner")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's start-up messages on stderr.")
def main(verbose: bool) -> None:
    """Train image-captioning models end to end and caption new images.

    \b
    Quick start (offline, synthetic data):
      captioner train --dataset demo
      captioner caption path/to/image.jpg
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


@main.command()
@config_options
@click.option("--mirror", help="Fetch the same file names from MIRROR/<file name>.")
@click.option("--skip-checksum", is_flag=True, default=None, help="Do not verify md5 sums.")
@fail_cleanly
def download(mirror: str | None, skip_checksum: bool | None, **common: Any) -> None:
    """Download and extract a dataset into DATA_DIR/<dataset>/raw/.

    \b
    Example:
      captioner download --dataset flickr8k
      captioner download --dataset demo        # synthetic, no network
    """
    cfg = resolve(**common, **{"download.mirror": mirror, "download.skip_checksum": skip_checksum})
    from captioner import download as stage

    click.echo(stage.download(cfg))


@main.command()
@config_options
@click.option(
    "--split",
    type=click.Choice(["official", "karpathy", "random"]),
    default=None,
    help="Which train/dev/test split to use.",
)
@click.option(
    "--format",
    "fmt",
    default=None,
    help="Caption format: auto, flickr8k, kaggle, flickr30k, hf, karpathy, csv, coco.",
)
@click.option("--captions", default=None, help="Your own caption file (with --format csv|coco).")
@click.option("--images", default=None, help="Your own image folder (with --format csv|coco).")
@fail_cleanly
def clean(
    split: str | None, fmt: str | None, captions: str | None, images: str | None, **common: Any
) -> None:
    """Parse the raw captions, normalise them and write DATA_DIR/<dataset>/captions.csv.

    \b
    Example:
      captioner clean --dataset flickr8k --split official
      captioner clean --dataset mine --format csv --captions caps.csv --images pics/
    """
    cfg = resolve(
        **common,
        **{
            "data.split": split,
            "data.format": fmt,
            "data.captions": captions,
            "data.images": images,
        },
    )
    from captioner import clean as stage

    click.echo(stage.clean(cfg))


@main.command()
@config_options
@click.option(
    "--encoder", default=None, help="vgg16 (default), resnet50, efficientnetb0, mobilenetv3small."
)
@click.option("--weights", default=None, help="imagenet, none, or a local .h5 file.")
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Images per inference batch (features.batch_size; not captions).",
)
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default=None)
@click.option("--shard", default=None, metavar="I/N", help="Compute only shard I of N (0..N-1).")
@click.option("--merge", is_flag=True, help="Assemble finished shards into the one cache.")
@click.option(
    "--grid",
    is_flag=True,
    help="Cache each image's last convolutional map (features.layout=grid), for attention.",
)
@fail_cleanly
def features(
    encoder: str | None,
    weights: str | None,
    batch_size: int | None,
    precision: str | None,
    shard: str | None,
    merge: bool,
    grid: bool,
    **common: Any,
) -> None:
    """Run the image encoder once over every image; cache to features/<encoder>[-grid]/.

    \b
    Example:
      captioner features --dataset flickr8k --encoder vgg16 --weights imagenet
      captioner features --dataset flickr8k --grid        # block5_conv3, 14x14x512
      captioner features --dataset flickr8k --grid --set features.grid_size=7
      captioner features --dataset demo --weights none --batch-size 32
    """
    cfg = resolve(
        **common,
        **{
            "features.encoder": encoder,
            "features.weights": weights,
            "features.batch_size": batch_size,
            "features.precision": precision,
            "features.shard": shard,
            "features.layout": "grid" if grid else None,
        },
    )
    start_tensorflow()
    from captioner import features as stage

    click.echo(stage.merge_shards(cfg) if merge else stage.extract(cfg))


@main.command()
@config_options
@click.option("--min-count", type=int, default=None, help="Rarer training words become <unk>.")
@fail_cleanly
def tokenizer(min_count: int | None, **common: Any) -> None:
    """Build the vocabulary from the training split into DATA_DIR/<dataset>/vocab.json.

    \b
    Example:
      captioner tokenizer --dataset flickr8k --min-count 5
    """
    cfg = resolve(**common, **{"tokenizer.min_count": min_count})
    from captioner import tokenizer as stage

    click.echo(stage.build_vocab(cfg))


@main.command()
@config_options
@click.option("--encoder", default=None, help="Which feature cache to train on.")
@click.option(
    "--decoder",
    type=click.Choice(LIMITS["model.decoder"]),
    default=None,
    help="The caption model (model.decoder); its features are extracted if missing.",
)
@click.option("--weights", default=None, help="Encoder weights if features must be computed.")
@click.option("--epochs", type=int, default=None)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Captions (not images) per training batch (train.batch_size).",
)
@click.option("--name", default=None, help="Run name (default <dataset>-<encoder>-<time>).")
@click.option(
    "--strategy",
    type=click.Choice(["default", "mirrored", "multiworker"]),
    default=None,
    help="tf.distribute strategy (multiworker reads TF_CONFIG).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the named run from its last checkpoint (with more --epochs: a finished one).",
)
@fail_cleanly
def train(
    encoder: str | None,
    decoder: str | None,
    weights: str | None,
    epochs: int | None,
    batch_size: int | None,
    name: str | None,
    strategy: str | None,
    resume: bool,
    **common: Any,
) -> None:
    """Train a caption model, running any missing earlier stage first.

    \b
    Example:
      captioner train --dataset flickr8k              # downloads, cleans, extracts, trains
      captioner train --dataset flickr8k --decoder attention     # on features/vgg16-grid/
      captioner train --dataset demo --epochs 5
      captioner train --dataset flickr8k --name f8k --resume
      captioner train --dataset flickr8k --name f8k --resume --epochs 30   # train further
    """
    cfg = resolve(
        **common,
        **{
            "features.encoder": encoder,
            "model.decoder": decoder,
            "features.weights": weights,
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "train.name": name,
            "train.strategy": strategy,
        },
    )
    start_tensorflow()
    from captioner import train as stage

    click.echo(stage.train(cfg, resume=resume))


@main.command()
@run_option
@click.option("--split", default="test", show_default=True, help="train, dev or test.")
@click.option("--beam", type=int, default=None, help="Beam width (1 = greedy).")
@click.option("--data-dir", default=None, help="Where the run's dataset lives, if moved.")
@fail_cleanly
def evaluate(run_dir: str, split: str, beam: int | None, data_dir: str | None) -> None:
    """Score a trained run: BLEU-1..4, CIDEr-D, ROUGE-L (METEOR with Java).

    \b
    Example:
      captioner evaluate --run runs/flickr8k-vgg16-20261121 --split test --beam 3
    """
    start_tensorflow()
    from captioner import evaluate as stage

    click.echo(stage.evaluate(Path(run_dir), split=split, beam=beam, data_dir=data_dir))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "runs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Run directory (repeatable). Default: the latest finished run under runs/.",
)
@click.option("--runs-dir", default="runs", show_default=True, help="Where to look for runs.")
@click.option("--beam", type=int, default=None, help="Beam width (1 = greedy).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of TSV.")
@click.option(
    "--attention",
    "attention_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Also draw where each word looked: DIR/<image>.png per image (attention runs; "
    "needs pip install 'captioner[plots]').",
)
@fail_cleanly
def caption(
    images: tuple[str, ...],
    runs: tuple[str, ...],
    runs_dir: str,
    beam: int | None,
    as_json: bool,
    attention_dir: str | None,
) -> None:
    """Caption images (files or folders) with one or several trained models.

    \b
    Example:
      captioner caption photo.jpg
      captioner caption photos/ --model runs/f30k --model runs/f8k --beam 5 --json
      captioner caption photo.jpg --model runs/f8k-attention --attention maps/
    """
    start_tensorflow()
    from captioner import caption as stage

    failures = stage.caption_command(
        images, runs, runs_dir=runs_dir, beam=beam, as_json=as_json, attention_dir=attention_dir
    )
    sys.exit(1 if failures else 0)


for command in (
    cli_results.runs,
    cli_results.plot,
    cli_results.app,
    cli_deploy.serve,
    cli_deploy.export,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
