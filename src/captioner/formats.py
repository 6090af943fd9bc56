"""Caption-file parsers: every real caption format, read into one shape (`CaptionSource`).

A reader returns the raw captions in file order, the split the file itself defines (if any) and
the numbers of the lines (or JSON entries) it could not parse. Deciding what to keep, normalising
and splitting is clean.py's job. Readers only read: raw/ is never modified.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import CaptionerError

# The one list of image file suffixes: caption files, `captioner caption FOLDER`, the app.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Split names used by the sources -> ours. Karpathy's "restval" images are training images.
SPLIT_NAMES = {
    "train": "train",
    "restval": "train",
    "val": "dev",
    "dev": "dev",
    "validation": "dev",
    "test": "test",
}
# Known caption files, richest first: with format "auto" the first one found wins. Sources that
# also define a split (token.txt + official split files, the HF csv, Karpathy's json) come first.
KNOWN_FILES = {
    "Flickr8k.token.txt": "flickr8k",
    "flickr_annotations_30k.csv": "hf",
    "dataset_flickr8k.json": "karpathy",
    "dataset_flickr30k.json": "karpathy",
    "results_20130124.token": "flickr8k",  # the original Flickr30k release uses the token format
    "results.csv": "flickr30k",
    "captions.txt": "kaggle",
}
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json")
# Which Karpathy file belongs to a caption format's dataset.
FAMILY = {"flickr8k": "flickr8k", "kaggle": "flickr8k", "flickr30k": "flickr30k", "hf": "flickr30k"}
OFFICIAL_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
UNREADABLE = "\ufffd"  # what a byte sequence that is not UTF-8 decodes to


@dataclass
class CaptionSource:
    """What one caption file holds, before any cleaning."""

    format: str
    path: Path
    records: list[tuple[str, str]] = field(default_factory=list)  # (image name, raw caption)
    splits: dict[str, str] = field(default_factory=dict)  # image -> train|dev|test, if defined
    malformed: list[int] = field(default_factory=list)  # 1-based numbers of unparsed lines/entries
    unit: str = "line"  # what `malformed` counts: "line" for text files, "entry" for JSON

    def add(self, image: str, captions: list[str], split: str) -> None:
        """Record one image's captions and the split the source puts it in."""
        self.splits[image] = split
        self.records.extend((image, caption) for caption in captions)


def is_image_name(name: str) -> bool:
    """True for names with an image extension (not the stray `...jpg.1` of Flickr8k.token.txt)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


# --- reading text --------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    """The file as text. Bytes that are not UTF-8 become U+FFFD so only their lines are lost."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CaptionerError(f"{path}: cannot read ({error.strerror}); check the path") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise CaptionerError(f"{path}: not UTF-8 text (looks like UTF-16); save it as UTF-8")
    return data.decode("utf-8-sig", errors="replace")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line; split on \\n only so numbers match editors."""
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            yield number, line.rstrip("\r")


def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Lower-cased header and (line number, fields) per line. Each line is parsed on its own, so
    a stray quote spoils only its own line, never the rest of the file."""
    lines = _lines(path)
    first = next(lines, None)
    header = [name.strip().lower() for name in next(csv.reader([first[1]]))] if first else []
    return header, ((number, next(csv.reader([line]))) for number, line in lines)


def _load_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        where = f"{error.msg} at line {error.lineno}"
        raise CaptionerError(f"{path}: not valid JSON ({where}); check the file") from None


# --- the readers ---------------------------------------------------------------------------------
def read_token_file(path: Path) -> CaptionSource:
    """Flickr8k.token.txt (and Flickr30k's results_20130124.token): `NAME.jpg#K<TAB>caption`."""
    source = CaptionSource("flickr8k", path)
    for number, line in _lines(path):
        name, tab, caption = line.partition("\t")
        name = name.split("#")[0].strip()
        if not tab or not name or UNREADABLE in line:
            source.malformed.append(number)
        else:
            source.records.append((name, caption))
    return source


def read_official_splits(folder: Path) -> dict[str, str]:
    """Flickr_8k.{train,dev,test}Images.txt in `folder` -> {image: split}; {} if any is missing."""
    paths = {split: Path(folder) / name for split, name in OFFICIAL_SPLIT_FILES.items()}
    if not all(path.is_file() for path in paths.values()):
        return {}
    return {line.strip(): split for split, path in paths.items() for _, line in _lines(path)}


def read_csv_file(path: Path, format_name: str = "csv") -> CaptionSource:
    """`image,caption[,split]` with a header: Kaggle's captions.txt and bring-your-own csv.

    Kaggle's captions may hold commas; when caption is the last column, extra fields are commas
    of the caption, not columns.
    """
    source = CaptionSource(format_name, path)
    header, rows = _csv_rows(path)
    if "image" not in header or "caption" not in header:
        raise CaptionerError(
            f"{path}: needs a header line with columns image,caption[,split]; "
            f"found {','.join(header) or 'nothing'}"
        )
    image_at, caption_at = header.index("image"), header.index("caption")
    split_at = header.index("split") if "split" in header else None
    for number, row in rows:
        if len(row) > len(header) and caption_at == len(header) - 1:
            row = row[:caption_at] + [",".join(row[caption_at:])]
        if len(row) != len(header) or UNREADABLE in "".join(row):
            source.malformed.append(number)
            continue
        image = row[image_at].strip()
        if split_at is not None:
            split = SPLIT_NAMES.get(row[split_at].strip().lower())
            # an unknown split name, or an image already seen in another split (first one wins)
            if split is None or source.splits.setdefault(image, split) != split:
                source.malformed.append(number)
                continue
        source.records.append((image, row[caption_at]))
    return source


def read_results_csv(path: Path) -> CaptionSource:
    """Kaggle's Flickr30k results.csv: `image_name| comment_number| comment`, with a header."""
    source = CaptionSource("flickr30k", path)
    for number, line in _lines(path):
        if number == 1 and line.lower().startswith("image_name"):
            continue
        fields = line.split("|", 2)
        if len(fields) != 3 or not fields[0].strip() or UNREADABLE in line:
            source.malformed.append(number)
        else:
            source.records.append((fields[0].strip(), fields[2]))
    return source


def read_hf_csv(path: Path) -> CaptionSource:
    """nlphuji/flickr30k's flickr_annotations_30k.csv: raw (JSON list of 5), split, filename."""
    source = CaptionSource("hf", path)
    header, rows = _csv_rows(path)
    if not {"raw", "split", "filename"} <= set(header):
        raise CaptionerError(
            f"{path}: needs columns raw, split and filename (Hugging Face "
            f"annotations csv); found {','.join(header) or 'nothing'}"
        )
    at = {name: header.index(name) for name in ("raw", "split", "filename")}
    for number, row in rows:
        try:
            captions = json.loads(row[at["raw"]])
            image, split = row[at["filename"]].strip(), SPLIT_NAMES[row[at["split"]].strip()]
            valid = bool(image) and isinstance(captions, list) and UNREADABLE not in "".join(row)
        except (IndexError, KeyError, json.JSONDecodeError):
            valid = False
        if valid and all(isinstance(caption, str) for caption in captions):
            source.add(image, captions, split)
        else:
            source.malformed.append(number)
    return source


def read_karpathy_json(path: Path) -> CaptionSource:
    """dataset_flickr8k.json / dataset_flickr30k.json: images[{filename, split, sentences}]."""
    source = CaptionSource("karpathy", path, unit="entry")
    data = _load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CaptionerError(f"{path}: not a Karpathy split file (no 'images' list)")
    for number, entry in enumerate(images, 1):
        try:
            image, split = str(entry["filename"]), SPLIT_NAMES[entry["split"]]
            captions = [str(s.get("raw") or " ".join(s["tokens"])) for s in entry["sentences"]]
        except (KeyError, TypeError, AttributeError):
            source.malformed.append(number)
        else:
            source.add(image, captions, split)
    return source


def read_coco_json(path: Path) -> CaptionSource:
    """COCO captions json: images[{id, file_name}], annotations[{image_id, caption}].

    Malformed numbers count annotations (1-based)."""
    source = CaptionSource("coco", path, unit="entry")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionerError(f"{path}: not a COCO captions file (no 'annotations' list)")
    names = {}
    for image in data.get("images") or []:
        if isinstance(image, dict) and isinstance(image.get("id"), (int, str)):
            names[image["id"]] = image.get("file_name")
    for number, annotation in enumerate(data["annotations"], 1):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        image = names.get(image_id) if isinstance(image_id, (int, str)) else None
        caption = annotation.get("caption") if image else None
        if not isinstance(image, str) or not isinstance(caption, str):
            source.malformed.append(number)
        else:
            source.records.append((image, caption))
    return source


READERS: dict[str, Callable[[Path], CaptionSource]] = {
    "flickr8k": read_token_file,
    "kaggle": lambda path: read_csv_file(path, "kaggle"),
    "flickr30k": read_results_csv,
    "hf": read_hf_csv,
    "karpathy": read_karpathy_json,
    "csv": read_csv_file,
    "coco": read_coco_json,
}


def check_format(format_name: str) -> str:
    """`format_name` if it is "auto" or has a reader; else a one-line error listing them."""
    if format_name != "auto" and format_name not in READERS:
        raise CaptionerError(
            f"unknown caption format '{format_name}'; use one of auto, {', '.join(READERS)}"
        )
    return format_name


def read(format_name: str, path: Path) -> CaptionSource:
    """Parse `path` as `format_name`; a file without a single caption is an error."""
    check_format(format_name)
    source = READERS[format_name](Path(path))
    if not source.records:
        raise CaptionerError(
            f"{path}: no captions found (read as format {format_name}, "
            f"{len(source.malformed)} malformed {source.unit}s); check the file"
        )
    return source


# --- finding the files ---------------------------------------------------------------------------
def walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, file names) below `root`, sorted, following links once, skipping __MACOSX junk."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        seen.add(os.path.realpath(folder))
        dirs[:] = sorted(
            d
            for d in dirs
            if d != "__MACOSX"
            and not d.startswith(".")
            and os.path.realpath(os.path.join(folder, d)) not in seen
        )
        yield Path(folder), sorted(files)


def find_sources(raw_dir: Path) -> dict[str, Path]:
    """Known caption files under `raw_dir`: {file name: shallowest path}."""
    found: dict[str, Path] = {}
    for folder, files in walk(raw_dir):
        for name in files:
            if name in KNOWN_FILES and name not in found:
                found[name] = folder / name
    return found


def karpathy_file(found: dict[str, Path], dataset: str, format_name: str) -> Path | None:
    """The Karpathy json for this dataset: dataset_<name>.json, else the caption format's one."""
    family = FAMILY.get(format_name, dataset)
    for name in (f"dataset_{dataset}.json", f"dataset_{family}.json"):
        if name in found:
            return found[name]
    return None


def choose_source(
    found: dict[str, Path], format_name: str, dataset: str, where: Path
) -> tuple[str, Path]:
    """(format, caption file): the richest known file in `found` (from `find_sources(where)`),
    or the one of the requested format."""
    for name, fmt in KNOWN_FILES.items():
        if name in found and format_name in ("auto", fmt):
            if fmt == "karpathy":
                return fmt, karpathy_file(found, dataset, format_name) or found[name]
            return fmt, found[name]
    wanted = [name for name, fmt in KNOWN_FILES.items() if format_name in ("auto", fmt)]
    raise CaptionerError(
        f"{where}: no caption file found (looked for {', '.join(wanted)}); "
        "download the dataset or pass --format csv|coco --captions FILE"
    )


def detect_format(path: Path) -> str:
    """Guess the format of a caption file passed with --captions, by name, then by content."""
    path = Path(path)
    if path.name in KNOWN_FILES:
        return KNOWN_FILES[path.name]
    if path.suffix == ".token":
        return "flickr8k"
    if path.suffix.lower() == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict) and "images" in data:
            return "karpathy"
        raise CaptionerError(
            f"{path}: unknown JSON caption format; expected COCO "
            "(images + annotations) or Karpathy (images with sentences)"
        )
    first = next(_lines(path), (0, ""))[1].lower()
    if first.startswith("image_name|"):
        return "flickr30k"
    return "hf" if {"raw", "filename"} <= {f.strip() for f in first.split(",")} else "csv"
