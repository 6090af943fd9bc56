"""Parsers of every caption format: real Flickr8k lines, and variants built from Flickr8k-layout
captions (real or synthetic)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from captioner import formats
from captioner.errors import CaptionerError

TOKEN = Path("Flickr8k_text") / "Flickr8k.token.txt"


def token_lines(fixtures: Path) -> list[str]:
    return (fixtures / TOKEN).read_text(encoding="utf-8").splitlines()


def real_captions(fixtures: Path, images: int) -> list[tuple[str, list[str]]]:
    """The first `images` images of Flickr8k.token.txt with their 5 captions, read by hand."""
    result: dict[str, list[str]] = {}
    for line in token_lines(fixtures)[: images * 5]:
        name, caption = line.split("\t")
        result.setdefault(name.split("#")[0], []).append(caption)
    return list(result.items())


def test_token_file_real_lines_keep_names_and_captions(tmp_path, flickr8k_fixtures):
    lines = token_lines(flickr8k_fixtures)
    stray = [line for line in lines if line.startswith("2258277193_586949ec62.jpg.1#")]
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("\n".join(lines[:10] + stray) + "\n", encoding="utf-8")
    source = formats.read("flickr8k", path)
    assert len(source.records) == 15 and source.malformed == []
    first = "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert source.records[0] == ("1000268201_693b08cb0e.jpg", first)
    # the stray entry is parsed; clean drops it because it is no image name
    assert ("2258277193_586949ec62.jpg.1", "people waiting for the subway") in source.records
    assert not formats.is_image_name("2258277193_586949ec62.jpg.1")
    assert formats.is_image_name("1000268201_693b08cb0e.jpg") and formats.is_image_name("A.PNG")


def test_malformed_and_unreadable_lines_are_numbered_the_rest_loads(tmp_path, flickr8k_like):
    good = [line.encode() for line in token_lines(flickr8k_like)[:6]]
    lines = good[:2] + [b"this line has no tab"] + good[2:3] + [b"1.jpg#0\tA caf\xe9 ."] + good[3:4]
    lines += [b"   "] + good[4:]  # a blank line is skipped, not malformed
    path = tmp_path / "Flickr8k.token.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = formats.read_token_file(path)
    assert source.malformed == [3, 5]
    assert [caption for _, caption in source.records] == [
        line.split("\t")[1] for line in token_lines(flickr8k_like)[:6]
    ]


def test_unreadable_or_empty_files_are_one_line_errors(tmp_path, flickr8k_like):
    utf16 = tmp_path / "Flickr8k.token.txt"
    utf16.write_text("\n".join(token_lines(flickr8k_like)[:5]), encoding="utf-16")
    empty = tmp_path / "captions.txt"
    empty.write_text("image,caption\n", encoding="utf-8")
    for fmt, path, problem in [
        ("flickr8k", utf16, "not UTF-8"),
        ("kaggle", empty, "no captions"),
        ("flickr8k", tmp_path / "missing.txt", "cannot read"),
    ]:
        with pytest.raises(CaptionerError) as error:
            formats.read(fmt, path)
        assert str(path) in str(error.value) and problem in str(error.value)
        assert "\n" not in str(error.value)


def test_kaggle_captions_with_commas_quoted_or_not(tmp_path, flickr8k_fixtures):
    lines = (flickr8k_fixtures / "captions.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "image,caption"
    rows = [line for line in lines if line.startswith("1012212859_01547e3f17.jpg,")]
    assert any('"' in row for row in rows)  # real lines whose captions hold commas
    unquoted = [row.replace('"', "") for row in rows]  # other copies do not quote them
    path = tmp_path / "captions.txt"
    path.write_text("\n".join([lines[0], *rows, *unquoted]) + "\n", encoding="utf-8")
    source = formats.read("kaggle", path)
    expected = dict(real_captions(flickr8k_fixtures, 8))["1012212859_01547e3f17.jpg"]
    assert [caption for _, caption in source.records] == expected + expected
    assert "A dog shakes its head near the shore , a red ball next to it ." in expected
    assert formats.detect_format(path) == "kaggle"


def test_flickr30k_results_csv_and_its_broken_line(tmp_path, flickr8k_like):
    captions = real_captions(flickr8k_like, 2)
    lines = ["image_name| comment_number| comment"]
    lines += [f"{image}| {k}| {text}" for image, texts in captions for k, text in enumerate(texts)]
    lines.insert(4, f"{captions[0][0]}| 4 {captions[0][1][4]}")  # as line 19999 of the real file
    path = tmp_path / "results.csv"
    path.write_text("\n".join(lines), encoding="utf-8")
    source = formats.read("flickr30k", path)
    assert source.malformed == [5]
    assert [(image, text.strip()) for image, text in source.records] == [
        (image, text) for image, texts in captions for text in texts
    ]
    renamed = tmp_path / "flickr30k_captions.csv"
    renamed.write_bytes(path.read_bytes())
    assert formats.detect_format(renamed) == "flickr30k"


def test_hugging_face_annotations_csv_gives_its_split(tmp_path, flickr8k_like):
    captions = real_captions(flickr8k_like, 3)
    path = tmp_path / "annotations.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        splits = ["train", "val", "test"]
        for index, ((image, texts), split) in enumerate(zip(captions, splits, strict=True)):
            writer.writerow(
                [
                    json.dumps(texts),
                    json.dumps(list(range(5 * index, 5 * index + 5))),
                    split,
                    image,
                    index,
                ]
            )
        writer.writerow(["not json", "[]", "train", "x.jpg", 9])
    source = formats.read("hf", path)
    assert source.malformed == [5]
    assert source.splits == {captions[0][0]: "train", captions[1][0]: "dev", captions[2][0]: "test"}
    assert source.records == [(image, text) for image, texts in captions for text in texts]
    assert formats.detect_format(path) == "hf"


def test_karpathy_json_maps_val_to_dev_and_restval_to_train(tmp_path, flickr8k_like):
    captions = real_captions(flickr8k_like, 4)
    splits = ["train", "val", "test", "restval"]
    images = [
        {
            "filename": image,
            "split": split,
            "sentences": [{"raw": text, "tokens": text.lower().split()} for text in texts],
        }
        for (image, texts), split in zip(captions, splits, strict=True)
    ]
    images.append({"filename": "broken.jpg", "split": "train"})  # no sentences
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}), encoding="utf-8")
    source = formats.read("karpathy", path)
    assert source.unit == "entry" and source.malformed == [5]
    assert [source.splits[image] for image, _ in captions] == ["train", "dev", "test", "train"]
    assert len(source.records) == 20 and source.records[5] == (captions[1][0], captions[1][1][0])


def test_coco_json_and_an_annotation_of_an_unknown_image(tmp_path, flickr8k_like):
    captions = real_captions(flickr8k_like, 2)
    data = {
        "images": [{"id": 10 + i, "file_name": image} for i, (image, _) in enumerate(captions)],
        "annotations": [
            {"image_id": 10 + i, "caption": text}
            for i, (_, texts) in enumerate(captions)
            for text in texts
        ],
    }
    data["annotations"].insert(2, {"image_id": 99, "caption": "an image that is not listed"})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert formats.detect_format(path) == "coco"
    source = formats.read("coco", path)
    assert source.malformed == [3] and source.splits == {}
    assert source.records == [(image, text) for image, texts in captions for text in texts]


def test_custom_csv_with_optional_split_column(tmp_path, flickr8k_like):
    (first, texts_a), (second, texts_b) = real_captions(flickr8k_like, 2)
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(
            [
                [first, texts_a[0], "train"],
                [second, texts_b[0], "val"],
                [first, texts_a[1], "test"],
                [second, texts_b[1], "holdout"],
            ]
        )
    source = formats.read("csv", path)
    assert source.splits == {first: "train", second: "dev"}
    assert source.malformed == [4, 5]  # first in two splits; an unknown split name
    assert source.records == [(first, texts_a[0]), (second, texts_b[0])]
    no_split = tmp_path / "plain.csv"
    no_split.write_text(f"image,caption\n{first},{texts_a[0]}\n", encoding="utf-8")
    assert formats.read("csv", no_split).splits == {}
    headless = tmp_path / "headless.csv"
    headless.write_text(f"{first},{texts_a[0]}\n", encoding="utf-8")
    with pytest.raises(CaptionerError, match="needs a header line with columns image,caption"):
        formats.read("csv", headless)


def test_find_sources_prefers_the_richest_file_and_skips_macosx(tmp_path):
    raw = tmp_path / "raw"
    for relative in [
        "captions.txt",
        "Flickr8k_text/Flickr8k.token.txt",
        "__MACOSX/Flickr8k.token.txt",
        "Flickr8k_text/Flickr8k.lemma.token.txt",
    ]:
        (raw / relative).parent.mkdir(parents=True, exist_ok=True)
        (raw / relative).write_text("x", encoding="utf-8")
    found = formats.find_sources(raw)
    assert found == {
        "captions.txt": raw / "captions.txt",
        "Flickr8k.token.txt": raw / "Flickr8k_text" / "Flickr8k.token.txt",
    }
    assert formats.choose_source(found, "auto", "flickr8k", raw) == (
        "flickr8k",
        raw / "Flickr8k_text" / "Flickr8k.token.txt",
    )
    kaggle = formats.choose_source(found, "kaggle", "flickr8k", raw)
    assert kaggle == ("kaggle", raw / "captions.txt")
    with pytest.raises(CaptionerError, match="flickr_annotations_30k.csv"):
        formats.choose_source(found, "hf", "flickr30k", raw)
