"""Issue 15, downloads: hostile URLs, names, zip bombs, stalling servers and missing files, each
against a loopback server (tests/loopback.py) and each checked to write nothing outside the
dataset's raw/ folder."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from guard import changed_outside, snapshot

from captioner import archive, download
from captioner.cli import main
from captioner.errors import CaptionerError


def one_error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    return errors[0]


def own_config(tiny_config, server, path: str, **dotted):
    return tiny_config(
        "mine", **{"download.urls": [server.url + path], "download.retries": 0, **dotted}
    )


@pytest.mark.parametrize(
    "url, name",
    [
        ("http://h/files/..%2F..%2Fevil.zip", "evil.zip"),
        ("http://h/files/..%5C..%5Cevil.zip", "evil.zip"),
        ("http://h/files/a%2Fb%2Fc.csv", "c.csv"),
        ("http://h/x%20y.zip?download=1", "x y.zip"),
        ("http://h/bad%00name%0A.txt", "badname.txt"),
    ],
)
def test_url_file_names_are_plain_base_names(url: str, name: str):
    assert download.file_name(url) == name


@pytest.mark.parametrize(
    "url", ["http://h/", "http://h/files/..%2F", "http://h/%2E%2E", "http://h/."]
)
def test_url_without_a_file_name_is_refused(url: str):
    with pytest.raises(CaptionerError, match="names no file"):
        download.file_name(url)


def test_escaped_separator_in_a_url_stays_inside_raw(tmp_path, tiny_config, server):
    path = "/files/..%2F..%2F..%2Fevil.zip"
    server.files[path] = zip_bytes({"evil/inside.txt": b"x"})
    cfg = own_config(tiny_config, server, path)
    before = snapshot(tmp_path)
    download.download(cfg)
    assert (cfg.raw_dir / "evil.zip").is_file()
    assert (cfg.raw_dir / "evil" / "inside.txt").read_bytes() == b"x"
    assert changed_outside(tmp_path, before, [cfg.raw_dir]) == []


@pytest.mark.parametrize(
    "args, key",
    [
        (["download", "--dataset", "../x"], "data.dataset"),
        (["download", "--dataset", "/abs"], "data.dataset"),
        (["clean", "--dataset", "a/b"], "data.dataset"),
        (["clean", "--dataset", "a\\b"], "data.dataset"),
        (["clean", "--dataset", ".hidden"], "data.dataset"),
        (["train", "--dataset", "demo", "--name", "../x"], "train.name"),
        (["train", "--dataset", "demo", "--name", "/tmp/run"], "train.name"),
        (["features", "--dataset", "demo", "--encoder", "../../x"], "features.encoder"),
        (["download", "--dataset", "demo", "--set", "data.dataset=.."], "data.dataset"),
    ],
)
def test_names_that_are_paths_are_refused_before_anything_is_written(
    tmp_path, monkeypatch, args, key
):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "--data-dir", "data"])
    assert f"config key '{key}' must be a plain name" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_plain_names_with_dots_and_spaces_are_fine(tiny_config):
    cfg = tiny_config("my pets.v2", **{"train.name": "run 1", "features.encoder": "clip-b.32"})
    assert cfg.dataset_dir.name == "my pets.v2" and cfg.features_dir.name == "clip-b.32"


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in entries.items():
            handle.writestr(name, data)
    return buffer.getvalue()


def zip_bomb(path: Path, mebibytes: int) -> Path:
    """One entry of zeros, streamed: about 1 KB per MiB when compressed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        with handle.open("bomb/zeros.bin", "w", force_zip64=True) as entry:
            for _ in range(mebibytes):
                entry.write(bytes(1 << 20))
    return path


def test_zip_bomb_is_refused_before_anything_is_extracted(tmp_path, tiny_config, server):
    bomb = zip_bomb(tmp_path / "bomb.zip", 64)
    assert bomb.stat().st_size < 200_000
    server.files["/bomb.zip"] = bomb.read_bytes()
    cfg = own_config(tiny_config, server, "/bomb.zip")
    before = snapshot(tmp_path)
    with pytest.raises(CaptionerError) as error:
        download.download(cfg)
    message = str(error.value)
    assert "\n" not in message and "download.max_extract_ratio = 100" in message
    assert sorted(p.name for p in cfg.raw_dir.iterdir()) == ["bomb.zip"]  # no contents, no marker
    assert changed_outside(tmp_path, before, [cfg.raw_dir]) == []


def test_total_size_cap_and_free_disk_space(tmp_path, monkeypatch):
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as handle:  # stored: ratio 1
        handle.writestr("data/a.bin", bytes(range(256)) * 40)
    small = archive.Limits(max_bytes=5000, max_ratio=100.0)
    with pytest.raises(CaptionerError, match="download.max_extract_bytes = 0.00 GiB"):
        archive.extract(plain, tmp_path / "raw", small)
    assert not (tmp_path / "raw").exists()

    class Usage:
        free = 1000

    monkeypatch.setattr(archive.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(CaptionerError, match="has only 0.00 GiB free"):
        archive.extract(plain, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    monkeypatch.undo()
    assert archive.extract(plain, tmp_path / "raw") == tmp_path / "raw"
    assert (tmp_path / "raw" / "data" / "a.bin").stat().st_size == 10240


def test_a_trickling_server_is_cut_and_resumed(tmp_path, server):
    body = bytes(range(256)) * 40
    server.files["/slow.bin"] = body
    server.trickles["/slow.bin"] = 0.05  # 20 bytes/s, once
    started = time.monotonic()
    dest = download.fetch(
        server.url + "/slow.bin",
        tmp_path / "slow.bin",
        retries=1,
        backoff=0.01,
        timeout=5,
        stall_seconds=0.5,
        min_speed=1000,
    )
    assert time.monotonic() - started < 5
    assert dest.read_bytes() == body
    assert server.requests[0] == ("/slow.bin", None)
    assert server.requests[1][1].startswith("bytes=")  # resumed where the trickle stopped
    assert server.requests[1][1] != "bytes=0-"


def test_stall_limit_is_one_line_after_the_retries(tmp_path, tiny_config, server):
    server.files["/slow.zip"] = b"x" * 1000
    server.trickles["/slow.zip"] = 0.05
    cfg = own_config(
        tiny_config,
        server,
        "/slow.zip",
        **{"download.stall_seconds": 0.3, "download.min_speed": 1000.0, "download.timeout": 5.0},
    )
    with pytest.raises(CaptionerError) as error:
        download.download(cfg)
    message = str(error.value)
    assert "\n" not in message and "stalled" in message and "download.min_speed" in message
    assert (cfg.raw_dir / "slow.zip.part").is_file()  # kept for the next run to resume


def test_404_names_the_url_and_mirror_without_retrying(tmp_path, monkeypatch, server):
    monkeypatch.chdir(tmp_path)
    url = server.url + "/gone/Flickr8k_text.zip"
    result = CliRunner().invoke(
        main,
        [
            "download",
            "--dataset",
            "mine",
            "--data-dir",
            "data",
            "--set",
            f'download.urls=["{url}"]',
            "--set",
            "download.retries=3",
        ],
    )
    line = one_error_line(result)
    assert url in line and "HTTP 404" in line and "not retried" in line
    assert "--mirror URL (which downloads URL/Flickr8k_text.zip)" in line
    assert len(server.requests) == 1
