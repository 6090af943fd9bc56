"""The clean stage on Flickr8k-layout files (real or synthetic): counts, splits, drops, reuse,
bring-your-own data."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from captioner import clean, formats
from captioner.captions import load_captions
from captioner.cli import main
from captioner.config import replace
from captioner.errors import CaptionerError

STRAY = "2258277193_586949ec62.jpg.1"


def make_raw(data_dir: Path, fixtures: Path, dataset: str = "flickr8k") -> Path:
    """data_dir/<dataset>/raw in Flickr8k's layout, made of links to the fixture files."""
    raw = data_dir / dataset / "raw"
    for folder in ("Flickr8k_text", "Flicker8k_Dataset"):
        (raw / folder).mkdir(parents=True)
        for path in (fixtures / folder).iterdir():
            (raw / folder / path.name).symlink_to(path)
    return raw


def listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def meta(cfg) -> dict:
    return json.loads(cfg.captions_csv.with_name("captions.json").read_text(encoding="utf-8"))


def test_full_fixture_official_split_then_reuse(tiny_config, flickr8k_fixtures, capsys):
    cfg = tiny_config("flickr8k")
    raw = make_raw(Path(cfg.data.data_dir), flickr8k_fixtures)
    before = listing(raw)
    assert clean.clean(cfg) == cfg.captions_csv
    info, log = meta(cfg), capsys.readouterr().err
    # Flickr8k.token.txt holds 10 exact repeats of a caption of the same image: dropped
    assert info["counts"]["images"] == 8091 and info["counts"]["captions"] == 40445
    assert info["dropped"]["duplicate_captions"] == 10
    assert {split: sizes["images"] for split, sizes in info["counts"]["splits"].items()} == {
        "train": 6000,
        "dev": 1000,
        "test": 1000,
    }
    assert info["dropped"]["not_image_entries"] == {"names": [STRAY], "captions": 5}
    assert info["dropped"]["no_split"] == {"images": 91, "captions": 455}
    assert info["split_used"] == "official" and info["format"] == "flickr8k"
    assert info["images_dir"] == "raw/Flicker8k_Dataset" and info["images_found"] == 24
    assert STRAY in log and "91 images" in log and "vocabulary (train)" in log
    assert listing(raw) == before  # raw is never modified

    frame, images_dir = load_captions(cfg)
    assert list(frame.columns) == ["image", "split", "caption", "raw"] and len(frame) == 39990
    assert frame["caption"].str.fullmatch(r"[a-z]+( [a-z]+)*").all()
    assert not frame["caption"].str.contains("startseq|endseq").any()
    test_file = flickr8k_fixtures / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    assert set(frame.loc[frame["split"] == "test", "image"]) == set(test_file.read_text().split())
    assert images_dir == cfg.dataset_dir / "raw" / "Flicker8k_Dataset"
    assert len(list(images_dir.glob("*.jpg"))) == 24

    written = cfg.captions_csv.stat().st_mtime_ns
    assert clean.clean(cfg) == cfg.captions_csv
    assert "reusing" in capsys.readouterr().err and cfg.captions_csv.stat().st_mtime_ns == written


def test_random_split_is_seeded_over_images_and_disjoint(tiny_config, flickr8k_fixtures):
    source = formats.read_token_file(flickr8k_fixtures / "Flickr8k_text" / "Flickr8k.token.txt")
    names = {image for image, _ in source.records if formats.is_image_name(image)}
    first = clean.random_split(sorted(names), 0, 0.1, 0.1)
    assert first == clean.random_split(sorted(names, reverse=True), 0, 0.1, 0.1)  # not file order
    assert first != clean.random_split(names, 1, 0.1, 0.1)
    assert sorted(pd.Series(first).value_counts().to_dict().items()) == [
        ("dev", 809),
        ("test", 809),
        ("train", 6473),
    ]
    with pytest.raises(CaptionerError, match="dev_fraction"):
        clean.random_split(names, 0, 0.5, 0.5)

    cfg = tiny_config("flickr8k", **{"data.split": "random"})
    make_raw(Path(cfg.data.data_dir), flickr8k_fixtures)
    clean.clean(cfg)
    frame, _ = load_captions(cfg)
    assert frame["image"].nunique() == 8091 and meta(cfg)["split_used"] == "random"
    assert (frame.groupby("image")["split"].nunique() == 1).all()  # an image's captions share it
    by_split = {split: set(group["image"]) for split, group in frame.groupby("split")}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["dev"] & by_split["test"])


def test_changed_settings_clean_again(tiny_config, flickr8k_like, capsys):
    cfg = tiny_config("flickr8k", **{"data.split": "random"})
    make_raw(Path(cfg.data.data_dir), flickr8k_like)
    clean.clean(cfg)
    splits = load_captions(cfg)[0].set_index(["image", "caption"])["split"]
    clean.clean(replace(cfg, seed=1))
    assert "reusing" not in capsys.readouterr().err and meta(cfg)["seed"] == 1
    assert not load_captions(cfg)[0].set_index(["image", "caption"])["split"].equals(splits)


def test_karpathy_split_needs_its_json(tiny_config, flickr8k_like):
    cfg = tiny_config("flickr8k", **{"data.split": "karpathy"})
    raw = make_raw(Path(cfg.data.data_dir), flickr8k_like)
    with pytest.raises(CaptionerError) as error:
        clean.clean(cfg)
    assert "dataset_flickr8k.json: not found" in str(error.value) and str(raw) in str(error.value)
    assert "\n" not in str(error.value)

    source = formats.read_token_file(raw / "Flickr8k_text" / "Flickr8k.token.txt")
    every = list(dict.fromkeys(image for image, _ in source.records))
    names = every[:30]
    splits = ["train"] * 20 + ["val"] * 5 + ["test"] * 3 + ["restval"] * 2
    images = [
        {"filename": name, "split": split, "sentences": [{"raw": "unused", "tokens": []}]}
        for name, split in zip(names, splits, strict=True)
    ]
    (raw / "dataset_flickr8k.json").write_text(json.dumps({"images": images}), encoding="utf-8")
    clean.clean(cfg)
    info = meta(cfg)
    assert info["split_used"] == "karpathy" and info["format"] == "flickr8k"  # captions: token.txt
    assert {split: sizes["images"] for split, sizes in info["counts"]["splits"].items()} == {
        "train": 22,
        "dev": 5,
        "test": 3,
    }
    assert info["dropped"]["no_split"]["images"] == len(every) - 30


def test_malformed_empty_and_stray_lines_are_reported(tiny_config, flickr8k_fixtures, capsys):
    cfg = tiny_config("mine")
    lines = (flickr8k_fixtures / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()
    stray = [line for line in lines if line.startswith(STRAY)]
    text = lines[:2] + ["garbage without a tab"] + lines[2:10] + ["1.jpg#0\t. , !"] + stray
    raw = Path(cfg.raw_dir)
    raw.mkdir(parents=True)
    (raw / "Flickr8k.token.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    clean.clean(cfg)
    dropped, log = meta(cfg)["dropped"], capsys.readouterr().err
    assert dropped["malformed"] == {"unit": "line", "count": 1, "first": [3]}
    assert dropped["empty_captions"] == 1 and dropped["not_image_entries"]["captions"] == 5
    assert "malformed line" in log and "(lines 3)" in log and "random split" in log
    assert meta(cfg)["split_used"] == "random" and meta(cfg)["counts"]["captions"] == 10
    assert meta(cfg)["images_found"] == 0 and meta(cfg)["images_dir"] == "raw"


@pytest.mark.parametrize("kind", ["csv", "coco"])
def test_bring_your_own_data(tiny_config, flickr8k_like, tmp_path, kind):
    images = flickr8k_like / "Flicker8k_Dataset"
    on_disk = {path.name for path in images.glob("*.jpg")}
    source = formats.read_token_file(flickr8k_like / "Flickr8k_text" / "Flickr8k.token.txt")
    records = [(image, caption) for image, caption in source.records if image in on_disk]
    if kind == "csv":
        captions = tmp_path / "my captions.csv"
        with open(captions, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([("image", "caption"), *records])
    else:
        ids = {name: i for i, name in enumerate(sorted(on_disk))}
        captions = tmp_path / "coco.json"
        captions.write_text(
            json.dumps(
                {
                    "images": [{"id": i, "file_name": name} for name, i in ids.items()],
                    "annotations": [
                        {"image_id": ids[name], "caption": text} for name, text in records
                    ],
                }
            )
        )
    cfg = tiny_config("mine", **{"data.captions": str(captions), "data.images": str(images)})
    clean.clean(cfg)
    info = meta(cfg)
    assert info["format"] == kind and info["counts"]["images"] == len(on_disk)
    assert info["images_missing"] == 0 and info["images_dir"] == str(images.resolve())
    frame, images_dir = load_captions(cfg)
    assert images_dir == images.resolve() and len(frame) == len(records) == 5 * len(on_disk)
    assert sorted(frame["raw"]) == sorted(caption.strip() for _, caption in records)


def test_load_captions_before_clean_names_the_fix(tiny_config):
    with pytest.raises(CaptionerError, match=re.escape("run `captioner clean --dataset flickr8k`")):
        load_captions(tiny_config("flickr8k"))


def test_cli_clean_prints_summary_and_path(tmp_path, flickr8k_fixtures):
    make_raw(tmp_path / "data", flickr8k_fixtures)
    result = CliRunner().invoke(
        main, ["clean", "--dataset", "flickr8k", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "data" / "flickr8k" / "captions.csv")
    assert "split official: train 6,000 images / 29,991 captions" in result.stderr
    assert "read 8,091 images, 40,445 captions" in result.stderr
    assert "dropped 10 exact repeats of an image's caption" in result.stderr


def test_cli_bad_input_is_one_line(tmp_path):
    missing = tmp_path / "nope.csv"
    result = CliRunner().invoke(
        main,
        [
            "clean",
            "--dataset",
            "mine",
            "--data-dir",
            str(tmp_path),
            "--format",
            "csv",
            "--captions",
            str(missing),
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == f"Error: {missing}: caption file not found; check --captions"
    assert os.listdir(tmp_path) == []  # nothing half-written
