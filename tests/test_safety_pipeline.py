"""Issue 15, pipeline and app: your own cleaned data trains, a failed start leaves nothing that
blocks the next one, caption files cannot reach outside the image folder, repeats and empty
captions are reported, a damaged model says so, and the app checks its port, escapes captions
and takes its Streamlit child down with it. Each case checks what was written where."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from guard import changed_outside, snapshot

from captioner.captions import load_captions
from captioner.cli import main
from captioner.errors import CaptionerError

TINY = [
    "--encoder",
    "mobilenetv3small",
    "--set",
    "features.precision=float32",
    "--set",
    "tokenizer.min_count=1",
]


def one_error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    return line


def pets(root: Path, fixtures: Path, rows: list[tuple[str, str, str]] | None = None) -> Path:
    """pets/images/ (6 real images) and pets/captions.csv (image, caption, split)."""
    images = root / "pets" / "images"
    images.mkdir(parents=True)
    names = sorted(p.name for p in (fixtures / "Flicker8k_Dataset").glob("*.jpg"))[:6]
    for name in names:
        shutil.copy(fixtures / "Flicker8k_Dataset" / name, images / name)
    splits = ["train", "train", "train", "dev", "dev", "test"]
    if rows is None:
        rows = [
            (name, f"a dog number {word} runs", split)
            for name, split, word in zip(names, splits, "abcdef", strict=True)
        ]
    with open(root / "pets" / "captions.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "caption", "split"), *rows])
    return root / "pets"


def clean_pets(root: Path, source: Path, fmt: str = "csv", name: str = "captions.csv"):
    return CliRunner().invoke(
        main,
        [
            "clean",
            "--dataset",
            "pets",
            "--data-dir",
            str(root / "data"),
            "--format",
            fmt,
            "--captions",
            str(source / name),
            "--images",
            str(source / "images"),
        ],
    )


def test_own_cleaned_data_trains_and_a_lost_meta_json_is_recomputed(
    tmp_path, flickr8k_fixtures, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    source = pets(tmp_path, flickr8k_fixtures)
    assert clean_pets(tmp_path, source).exit_code == 0
    before = snapshot(tmp_path)
    train = ["train", "--dataset", "pets", "--data-dir", "data", "--weights", "none", *TINY]
    tiny = ["--epochs", "1", "--set", "model.units=8", "--set", "model.embed_dim=8"]
    result = CliRunner().invoke(main, [*train, *tiny, "--name", "pets"])
    assert result.exit_code == 0, result.output
    assert "no files to download" not in result.output
    features = tmp_path / "data" / "pets" / "features" / "mobilenetv3small"
    assert json.loads((features / "meta.json").read_text())["count"] == 6
    assert (tmp_path / "runs" / "pets" / "model.keras").is_file()
    assert changed_outside(tmp_path, before, [tmp_path / "data", tmp_path / "runs"]) == []

    (features / "meta.json").unlink()  # a finished cache loses its meta.json
    result = CliRunner().invoke(main, [*train, *tiny, "--name", "pets2"])
    assert result.exit_code == 0, result.output
    assert "features.npy without meta.json" in result.output
    assert json.loads((features / "meta.json").read_text())["count"] == 6


def test_a_failed_start_does_not_poison_the_feature_cache(tmp_path, flickr8k_fixtures):
    from captioner.io import write_json

    source = pets(tmp_path, flickr8k_fixtures)
    assert clean_pets(tmp_path, source).exit_code == 0
    features = ["features", "--dataset", "pets", "--data-dir", str(tmp_path / "data"), *TINY]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, [*features, "--weights", "/etc/passwd"])
    assert "/etc/passwd: not mobilenetv3small weights" in one_error_line(result)
    features_dir = tmp_path / "data" / "pets" / "features" / "mobilenetv3small"
    assert not (features_dir / "chunks").exists()
    assert changed_outside(tmp_path, before) == []
    # what an older captioner left: a plan, no finished chunk; it binds nothing
    write_json(features_dir / "chunks" / "plan.json", {"weights": "/etc/passwd", "chunk_size": 2})
    result = CliRunner().invoke(main, [*features, "--weights", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((features_dir / "meta.json").read_text())["weights"] == "none"


@pytest.mark.parametrize("evil", ["../../../etc/passwd.jpg", "/etc/passwd.jpg", "a/../../b.jpg"])
def test_coco_file_names_outside_the_image_folder_are_refused(tmp_path, flickr8k_fixtures, evil):
    source = pets(tmp_path, flickr8k_fixtures)
    good = sorted(p.name for p in (source / "images").iterdir())
    coco = {
        "images": [{"id": 1, "file_name": good[0]}, {"id": 2, "file_name": evil}],
        "annotations": [
            {"image_id": 1, "caption": "a dog runs"},
            {"image_id": 2, "caption": "a secret file"},
        ],
    }
    (source / "coco.json").write_text(json.dumps(coco))
    before = snapshot(tmp_path)
    line = one_error_line(clean_pets(tmp_path, source, "coco", "coco.json"))
    assert f"image '{evil}' is outside the image folder" in line
    assert changed_outside(tmp_path, before) == []


def test_captions_csv_edited_to_leave_the_image_folder_is_refused(tiny_config, flickr8k_fixtures):
    from tinydata import write_captions

    cfg = tiny_config("demo")
    frame = write_captions(cfg, flickr8k_fixtures, {"train": 2})
    frame.loc[0, "image"] = "../../secret.jpg"
    frame.to_csv(cfg.captions_csv, index=False)
    with pytest.raises(CaptionerError, match="'../../secret.jpg' is outside the image"):
        load_captions(cfg)


def test_exact_repeats_are_dropped_and_counted(tmp_path, flickr8k_fixtures):
    names = sorted(p.name for p in (flickr8k_fixtures / "Flicker8k_Dataset").glob("*.jpg"))[:6]
    rows = [(name, "A dog runs .", "train") for name in names[:3]] * 3  # each twice more
    rows += [(names[0], "a dog runs.", "train")]  # cleans the same, but not an exact repeat
    rows += [
        (names[3], "a cat sits", "dev"),
        (names[4], "a cat", "dev"),
        (names[5], "a cat", "test"),
    ]
    source = pets(tmp_path, flickr8k_fixtures, rows)
    assert clean_pets(tmp_path, source).exit_code == 0
    info = json.loads((tmp_path / "data" / "pets" / "captions.json").read_text())
    assert info["dropped"]["duplicate_captions"] == 6
    frame = pd.read_csv(tmp_path / "data" / "pets" / "captions.csv", dtype=str)
    assert len(frame) == 3 + 1 + 3 and not frame.duplicated(["image", "raw"]).any()


def test_punctuation_only_captions_say_they_are_empty_after_cleaning(tmp_path, flickr8k_fixtures):
    names = sorted(p.name for p in (flickr8k_fixtures / "Flicker8k_Dataset").glob("*.jpg"))[:3]
    rows = [(name, caption, "train") for name in names for caption in ("...", "!!!", "42 :-)")]
    source = pets(tmp_path, flickr8k_fixtures, rows)
    before = snapshot(tmp_path)
    line = one_error_line(clean_pets(tmp_path, source))
    assert "no usable captions (9 captions are empty after cleaning" in line
    assert "real image entry" not in line
    assert changed_outside(tmp_path, before) == []


def test_a_truncated_model_is_reported_as_corrupt(tmp_path, flickr8k_fixtures):
    from captioner.config import Config
    from captioner.io import write_json
    from captioner.tokenizer import Vocabulary

    run = tmp_path / "runs" / "cut"
    run.mkdir(parents=True)
    write_json(run / "config.json", Config().to_dict())
    write_json(run / "vocab.json", Vocabulary.from_captions(["a dog runs"]).to_json())
    write_json(run / "features_meta.json", {})
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as archive:
        archive.writestr("config.json", "{}" * 1000)
    (run / "model.keras").write_bytes(whole.read_bytes()[:500])
    image = flickr8k_fixtures / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg"
    before = snapshot(tmp_path)
    line = one_error_line(CliRunner().invoke(main, ["caption", str(image), "--model", str(run)]))
    assert "model.keras: unreadable or corrupt" in line and "File not found" not in line
    assert changed_outside(tmp_path, before) == []


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_app_port_is_checked_before_anything_starts(tmp_path, port):
    result = CliRunner().invoke(main, ["app", "--model", str(tmp_path), "--port", port])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--port'" in result.output and "1<=x<=65535" in result.output


def test_empty_and_markdown_captions_are_escaped():
    from captioner import app

    assert app.caption_markdown("") == "*(empty caption: the model ended at once)*"
    assert "****" not in app.caption_markdown("   ")
    assert app.caption_markdown("a dog") == "**a dog**"
    assert app.caption_markdown("*a* _dog_ # [x](y)") == r"**\*a\* \_dog\_ \# \[x\]\(y\)**"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@pytest.mark.slow
def test_sigterm_to_the_app_stops_its_streamlit_child_too(tmp_path):
    pytest.importorskip("streamlit")
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")  # launching only checks that it is there
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-m", "captioner.cli", "app", "--model", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    child = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert parent.poll() is None, "captioner app exited early"
            time.sleep(0.2)
        else:
            pytest.fail("streamlit did not start listening")
        [child] = children(parent.pid)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=20) in (0, 128 + signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(child), "the Streamlit child is still running"
    finally:  # never leave a server behind, even when the test fails
        if parent.poll() is None:
            parent.kill()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)
