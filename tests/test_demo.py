"""The synthetic demo dataset: deterministic, Flickr8k's layout, learnable captions."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from captioner import demo, download
from captioner.cli import main
from captioner.errors import CaptionerError

SMALL = {
    "demo.train_images": 12,
    "demo.dev_images": 4,
    "demo.test_images": 3,
    "demo.image_size": 64,
}


def make(tiny_config, tmp_path: Path, folder: str, seed: int = 0, **dotted):
    return tiny_config(
        "demo", **{**SMALL, "data.data_dir": str(tmp_path / folder), "seed": seed, **dotted}
    )


def read_tokens(raw: Path) -> dict[str, list[str]]:
    captions = defaultdict(list)
    for line in (raw / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, caption = line.split("\t")
        name, number = key.split("#")
        assert int(number) == len(captions[name])  # #0..#4 in order
        captions[name].append(caption)
    return captions


def test_layout_counts_and_captions(tiny_config, tmp_path):
    cfg = make(tiny_config, tmp_path, "a")
    raw = download.download(cfg)  # "demo" goes through the download stage, no network
    assert raw == cfg.raw_dir

    images = sorted(p.name for p in (raw / "Flicker8k_Dataset").iterdir())
    assert len(images) == 19
    for name in images:
        with Image.open(raw / "Flicker8k_Dataset" / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)

    captions = read_tokens(raw)
    assert sorted(captions) == images
    assert all(len(set(texts)) == len(texts) == 5 for texts in captions.values())

    splits = {
        s: (raw / "Flickr8k_text" / f"Flickr_8k.{s}Images.txt").read_text().split()
        for s in ("train", "dev", "test")
    }
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [12, 4, 3]
    assert sorted(sum(splits.values(), [])) == images  # disjoint and covering
    assert json.loads((raw / "demo.json").read_text())["train_images"] == 12


def test_same_seed_same_bytes_other_seed_differs(tiny_config, tmp_path):
    first = demo.generate(make(tiny_config, tmp_path, "a", seed=3))
    again = demo.generate(make(tiny_config, tmp_path, "b", seed=3))
    other = demo.generate(make(tiny_config, tmp_path, "c", seed=4))
    token = "Flickr8k_text/Flickr8k.token.txt"
    assert (first / token).read_bytes() == (again / token).read_bytes()
    assert (first / token).read_bytes() != (other / token).read_bytes()
    for path in (first / "Flicker8k_Dataset").iterdir():
        assert path.read_bytes() == (again / "Flicker8k_Dataset" / path.name).read_bytes()
    image = "Flicker8k_Dataset/demo_00000.jpg"
    assert (first / image).read_bytes() != (other / image).read_bytes()


def test_reuses_finished_data_and_regenerates_on_new_settings(tiny_config, tmp_path, capsys):
    cfg = make(tiny_config, tmp_path, "a")
    raw = demo.generate(cfg)
    stamp = (raw / "Flickr8k_text" / "Flickr8k.token.txt").stat().st_mtime_ns
    capsys.readouterr()
    demo.generate(cfg)
    assert "reusing" in capsys.readouterr().err
    assert (raw / "Flickr8k_text" / "Flickr8k.token.txt").stat().st_mtime_ns == stamp

    fewer = make(tiny_config, tmp_path, "a", **{"demo.train_images": 5})
    demo.generate(fewer)
    assert len(list((raw / "Flicker8k_Dataset").iterdir())) == 12  # no stale images left
    assert len(read_tokens(raw)) == 12

    (raw / "demo.json").unlink()  # as if killed before the end: generated again
    demo.generate(fewer)
    assert (raw / "demo.json").is_file()


def test_captions_state_the_visible_facts_with_a_small_vocabulary():
    vocabulary, lengths = set(), []
    for index in range(400):
        scene = demo.sample_scene(np.random.default_rng([0, index]))
        texts = demo.captions(scene)
        assert len(set(texts)) == 5
        for text in texts:
            words = text.split()
            vocabulary.update(words)
            lengths.append(len(words))
            assert scene.background in words
            for shape in scene.shapes:
                assert shape.colour in words and shape.kind in words
    assert 30 <= len(vocabulary) <= 60
    assert 5 <= min(lengths) and max(lengths) <= 12
    assert all(word.isalpha() and word.islower() for word in vocabulary)  # clean already


def test_image_shows_the_captioned_colour_where_the_caption_says():
    """A big shape 'on the left' paints the left half, not the right, in its colour."""
    scene = demo.Scene("white", (demo.Shape("red", "square", "big", "on the left"),))
    pixels = np.asarray(demo.draw(scene, 128, np.random.default_rng(0))).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red[:, :64].sum() > 0.15 * 128 * 128 and red[:, 64:].sum() < 0.02 * 128 * 128


def test_cli_demo_and_bad_settings(tmp_path):
    args = [
        "download",
        "--dataset",
        "demo",
        "--data-dir",
        str(tmp_path),
        "--set",
        "demo.train_images=3",
        "--set",
        "demo.dev_images=1",
        "--set",
        "demo.test_images=1",
        "--set",
        "demo.image_size=48",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "demo/raw/Flicker8k_Dataset").glob("*.jpg"))) == 5

    bad = CliRunner().invoke(main, [*args, "--set", "demo.test_images=-1"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "'demo.test_images' must be in [0, 1000000000], got -1" in bad.output


def test_demo_cleans_with_the_flickr8k_code(tiny_config, tmp_path):
    from captioner import clean
    from captioner.captions import load_captions

    cfg = make(tiny_config, tmp_path, "a")
    demo.generate(cfg)
    clean.clean(cfg)
    frame, images_dir = load_captions(cfg)
    assert images_dir == cfg.raw_dir / "Flicker8k_Dataset"
    assert frame.groupby("split")["image"].nunique().to_dict() == {"train": 12, "dev": 4, "test": 3}
    assert len(frame) == 19 * 5


def test_bad_settings_raise(tiny_config, tmp_path):
    with pytest.raises(CaptionerError, match=r"'demo.image_size' must be in \[32, 4096\]"):
        make(tiny_config, tmp_path, "a", **{"demo.image_size": 8})
