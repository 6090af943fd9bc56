"""Issue 15, "files that hang or exhaust memory": images are read only from regular files up to
MAX_IMAGE_BYTES (a FIFO, /dev/zero or a folder named x.jpg is reported, not read), and file
names with a tab or newline keep the TSV output of `captioner caption` one row per line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_evaluate import write_run

from captioner import caption, images
from captioner.images import MAX_IMAGE_BYTES, NOT_REGULAR, BadImage, load_image

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")


def within(seconds: float, function, *args):
    """function(*args) in a daemon thread; fails (instead of hanging the suite) if it blocks."""
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = function(*args)
        except Exception as error:  # noqa: BLE001  handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__}{args} blocked for {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a symlink to /dev/zero and a folder, each named like an image."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fifo": folder / "x.jpg", "zero": folder / "z.jpg", "folder": folder / "d.jpg"}
    os.mkfifo(files["fifo"])
    files["zero"].symlink_to("/dev/zero")
    files["folder"].mkdir()
    return files


@needs_fifo
@pytest.mark.parametrize("kind", ["fifo", "zero", "folder"])
def test_special_files_are_refused_without_reading(tmp_path: Path, kind: str):
    path = special_files(tmp_path)[kind]
    with pytest.raises(BadImage, match=f"^{re.escape(NOT_REGULAR)}$"):
        within(10, load_image, path)


def test_files_over_the_size_cap_are_refused_unread(tmp_path: Path, flickr8k_fixtures):
    image = next((flickr8k_fixtures / "Flicker8k_Dataset").glob("*.jpg"))
    assert load_image(image).shape == (224, 224, 3)
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:  # sparse: no disk space used
        handle.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(BadImage, match=r"^too large: over 256 MiB \(captioner.images"):
        within(10, load_image, huge)
    with pytest.raises(BadImage, match="^missing: no such file$"):
        load_image(tmp_path / "absent.jpg")


def test_the_cap_is_checked_on_what_is_read(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10)
    path = tmp_path / "eleven.jpg"
    path.write_bytes(b"x" * 11)
    with pytest.raises(BadImage, match="^too large"):
        images.read_image_file(path)
    path.write_bytes(b"x" * 10)
    assert images.read_image_file(path) == b"x" * 10


def test_tsv_fields_are_escaped_and_round_trip():
    name = "a\tb\nc\\d\re.jpg"
    field = caption.tsv_field(name)
    assert field == "a\\tb\\nc\\\\d\\re.jpg" and not {"\t", "\n", "\r"} & set(field)
    unescape = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    decoded = re.sub(r"\\(.)", lambda match: unescape[match[1]], field)  # what a reader does
    assert decoded == name
    assert caption.tsv_field("plain/photo 1.jpg") == "plain/photo 1.jpg"


@needs_fifo
@pytest.mark.slow  # a subprocess loads TensorFlow and a tiny run
def test_caption_cli_skips_special_files_and_escapes_names(
    tmp_path: Path, tiny_config, flickr8k_fixtures
):
    run_dir, _ = write_run(tmp_path, tiny_config, flickr8k_fixtures)
    image = sorted((flickr8k_fixtures / "Flicker8k_Dataset").glob("*.jpg"))[0]
    odd = tmp_path / "in" / "tab\there\nnew.jpg"
    special = special_files(tmp_path / "in")
    shutil.copy(image, odd)
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "inner.jpg")
    args = [str(image), str(odd), str(special["fifo"]), str(special["zero"]), str(folder)]
    done = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "caption", *args, "--model", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [row[:2] for row in rows] == [
        [str(image), "tiny"],
        [str(tmp_path / "in" / "tab\\there\\nnew.jpg"), "tiny"],
    ]
    assert all(len(row) == 3 for row in rows)
    refused = [line for line in done.stderr.splitlines() if line.endswith(NOT_REGULAR)]
    assert sorted(line[: -len(NOT_REGULAR) - 2] for line in refused) == sorted(
        [str(special["fifo"]), str(special["zero"]), str(folder / "inner.jpg")]
    )
