"""The download stage against a local HTTP server (127.0.0.1 only): resume, checksums, retries,
mirrors, safe and idempotent extraction, and the CLI's one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from loopback import Server

from captioner import download
from captioner.cli import main
from captioner.errors import CaptionerError

IMAGES = 5  # fixture images put in the test archive


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def flickr8k_archives(flickr8k_like: Path) -> dict[str, bytes]:
    """Flickr8k's two archives in their real layout: a few real images plus macOS junk, and the
    real text files as loose entries (as Flickr8k_text.zip holds them)."""
    images = sorted((flickr8k_like / "Flicker8k_Dataset").glob("*.jpg"))[:IMAGES]
    dataset = {f"Flicker8k_Dataset/{p.name}": p.read_bytes() for p in images}
    dataset["__MACOSX/Flicker8k_Dataset/._" + images[0].name] = b"junk"
    dataset["Flicker8k_Dataset/._" + images[1].name] = b"junk"
    text = {p.name: p.read_bytes() for p in (flickr8k_like / "Flickr8k_text").glob("*.txt")}
    karpathy = {
        "images": [
            {
                "filename": images[0].name,
                "split": "train",
                "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}],
            }
        ]
    }
    return {
        "/Flickr8k_Dataset.zip": zip_bytes(dataset),
        "/Flickr8k_text.zip": zip_bytes(text),
        "/caption_datasets.zip": zip_bytes(
            {"dataset_flickr8k.json": json.dumps(karpathy).encode()}
        ),
    }


def flickr8k_config(tiny_config, server: Server, archives: dict[str, bytes], **dotted):
    names = ["/Flickr8k_Dataset.zip", "/Flickr8k_text.zip"]
    settings = {
        "download.urls": [server.url + n for n in names],
        "download.md5": [md5(archives[n]) for n in names],
        "download.karpathy_url": server.url + "/caption_datasets.zip",
        "download.backoff": 0.01,
        "download.retries": 1,
        **dotted,
    }
    return tiny_config("flickr8k", **settings)


def test_download_extracts_the_flickr8k_layout_then_reuses_it(
    tiny_config, server, flickr8k_archives, flickr8k_like, capsys
):
    server.files.update(flickr8k_archives)
    cfg = flickr8k_config(tiny_config, server, flickr8k_archives)
    raw = download.download(cfg)

    assert raw == cfg.raw_dir
    assert len(list((raw / "Flicker8k_Dataset").glob("*.jpg"))) == IMAGES
    assert not list(raw.rglob("._*")) and not (raw / "__MACOSX").exists()  # junk skipped
    token = raw / "Flickr8k_text" / "Flickr8k.token.txt"  # loose files got their folder
    real = flickr8k_like / "Flickr8k_text" / "Flickr8k.token.txt"
    assert token.read_bytes() == real.read_bytes()
    assert (raw / ".Flickr8k_Dataset.zip.extracted").is_file()
    assert json.loads((raw / "dataset_flickr8k.json").read_text())["images"][0]["split"] == "train"
    assert not list(raw.glob("*.part"))

    served = len(server.requests)
    capsys.readouterr()
    assert download.download(cfg) == raw
    assert len(server.requests) == served  # nothing downloaded the second time
    assert capsys.readouterr().err.count("reusing") == 2

    from captioner import clean

    clean.clean(cfg)
    meta = json.loads(cfg.captions_csv.with_name("captions.json").read_text())
    assert meta["images_dir"] == "raw/Flicker8k_Dataset"
    assert meta["images_found"] == IMAGES


def test_cut_transfer_resumes_from_the_partial_file(tiny_config, server, flickr8k_archives):
    server.files.update(flickr8k_archives)
    name, body = "/Flickr8k_text.zip", flickr8k_archives["/Flickr8k_text.zip"]
    cfg = tiny_config(
        "flickr8k",
        **{
            "download.urls": [server.url + name],
            "download.md5": [md5(body)],
            "download.retries": 0,
            "download.karpathy_url": "",
        },
    )
    server.cuts[name] = 1000
    with pytest.raises(CaptionerError, match="--mirror"):
        download.download(cfg)
    assert (cfg.raw_dir / "Flickr8k_text.zip.part").stat().st_size == 1000
    assert not (cfg.raw_dir / "Flickr8k_text.zip").exists()  # not complete yet

    download.download(cfg)  # the next run
    assert server.requests[-1] == (name, "bytes=1000-")
    assert (cfg.raw_dir / "Flickr8k_text.zip").read_bytes() == body
    assert (cfg.raw_dir / "Flickr8k_text" / "Flickr_8k.devImages.txt").is_file()


def test_cut_transfer_is_resumed_by_a_retry_within_one_run(tmp_path, server):
    body = bytes(range(256)) * 40
    server.files["/data.bin"] = body
    server.cuts["/data.bin"] = 3000
    dest = download.fetch(
        server.url + "/data.bin", tmp_path / "data.bin", md5(body), retries=1, backoff=0.01
    )
    assert dest.read_bytes() == body
    assert server.requests == [("/data.bin", None), ("/data.bin", "bytes=3000-")]


def test_whole_partial_file_is_finished_without_refetching(tmp_path, server):
    """Killed after the last byte but before the rename: the server answers 416."""
    body = b"x" * 5000
    server.files["/data.bin"] = body
    (tmp_path / "data.bin.part").write_bytes(body)
    download.fetch(server.url + "/data.bin", tmp_path / "data.bin", md5(body), retries=0)
    assert (tmp_path / "data.bin").read_bytes() == body
    assert server.requests == [("/data.bin", "bytes=5000-")]


def test_checksum_mismatch_is_one_line_and_keeps_nothing(tiny_config, server, flickr8k_archives):
    server.files.update(flickr8k_archives)
    actual = md5(flickr8k_archives["/Flickr8k_text.zip"])
    cfg = tiny_config(
        "flickr8k",
        **{
            "download.urls": [server.url + "/Flickr8k_text.zip"],
            "download.md5": ["0" * 32],
            "download.karpathy_url": "",
        },
    )
    with pytest.raises(CaptionerError) as error:
        download.download(cfg)
    message = str(error.value)
    assert "\n" not in message and "Flickr8k_text.zip" in message
    assert actual in message and "0" * 32 in message
    assert list(cfg.raw_dir.iterdir()) == []  # neither the file nor its .part nor a marker

    skip = tiny_config(
        "flickr8k",
        **{
            "download.urls": [server.url + "/Flickr8k_text.zip"],
            "download.md5": ["0" * 32],
            "download.karpathy_url": "",
            "download.skip_checksum": True,
        },
    )
    download.download(skip)
    assert (skip.raw_dir / "Flickr8k_text.zip").is_file()


@pytest.mark.parametrize(
    "evil", ["../evil.txt", "/tmp/evil.txt", "ok/../../evil.txt", "C:/evil.txt"]
)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_entries_outside_the_target_are_refused(tmp_path: Path, evil: str, kind: str):
    archive = tmp_path / f"bad.{kind}"
    entries = {"good/a.txt": b"fine", evil: b"evil"}
    if kind == "zip":
        archive.write_bytes(zip_bytes(entries))
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "raw"
    with pytest.raises(CaptionerError, match=f"entry '{evil}' would land outside"):
        download.extract(archive, target)
    assert not target.exists()  # checked before anything is written
    assert not (tmp_path / "evil.txt").exists()


def test_tar_links_refused_and_tar_extracts(tmp_path: Path):
    good, bad = tmp_path / "good.tar.gz", tmp_path / "bad.tar"
    with tarfile.open(good, "w:gz") as tar:
        info = tarfile.TarInfo("Flickr8k_text/Flickr8k.token.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert download.extract(good, tmp_path / "raw") == tmp_path / "raw"
    assert (tmp_path / "raw/Flickr8k_text/Flickr8k.token.txt").read_bytes() == b"abc"
    with tarfile.open(bad, "w") as tar:
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(CaptionerError, match="is a link or device"):
        download.extract(bad, tmp_path / "raw2")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dead_url_retries_then_one_line_cli_error(tmp_path: Path):
    url = f"http://127.0.0.1:{closed_port()}/Flickr8k_text.zip"
    result = CliRunner().invoke(
        main,
        [
            "download",
            "--dataset",
            "flickr8k",
            "--data-dir",
            str(tmp_path),
            "--set",
            f'download.urls=["{url}"]',
            "--set",
            'download.md5=[""]',
            "--set",
            "download.retries=2",
            "--set",
            "download.backoff=0.01",
        ],
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and url in errors[0] and "--mirror" in errors[0]
    assert "after 3 attempt(s)" in errors[0]
    assert result.output.count("retry ") == 2  # the two retries were logged


def test_missing_file_is_not_retried(tmp_path: Path, server):
    with pytest.raises(CaptionerError, match="404"):
        download.fetch(server.url + "/nothing.zip", tmp_path / "nothing.zip", retries=3)
    assert len(server.requests) == 1


def test_mirror_replaces_the_host(tiny_config, server, flickr8k_archives):
    server.files["/mirror/Flickr8k_text.zip"] = flickr8k_archives["/Flickr8k_text.zip"]
    dead = f"http://127.0.0.1:{closed_port()}/releases/download/Flickr8k_text.zip"
    cfg = tiny_config(
        "flickr8k",
        **{
            "download.urls": [dead],
            "download.md5": [""],
            "download.mirror": server.url + "/mirror/",
            "download.karpathy_url": server.url + "/gone.zip",
        },
    )
    download.download(cfg)  # a dead Karpathy link is only a warning
    assert [path for path, _ in server.requests] == ["/mirror/Flickr8k_text.zip", "/gone.zip"]
    assert (cfg.raw_dir / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    assert not (cfg.raw_dir / "dataset_flickr8k.json").exists()
    assert download.mirrored("https://h.org/a/b/x%20y.zip", "http://m/") == "http://m/x%20y.zip"


def test_builtin_table_matches_the_bundled_configs(tiny_config):
    for name in download.DATASETS:
        cfg = tiny_config(name)
        fallback = tiny_config(name, **{"download.urls": [], "download.md5": []})
        assert download.sources(cfg) == download.sources(fallback) == list(download.DATASETS[name])
    mirrored = tiny_config("flickr8k", **{"download.mirror": "http://m.org/f8k"})
    assert [url for url, _ in download.sources(mirrored)] == [
        "http://m.org/f8k/Flickr8k_Dataset.zip",
        "http://m.org/f8k/Flickr8k_text.zip",
    ]
    with pytest.raises(CaptionerError, match="2 sums for 1 urls"):
        download.sources(
            tiny_config("x", **{"download.urls": ["http://a/b.zip"], "download.md5": ["", ""]})
        )


def test_own_data_needs_no_download_and_unknown_dataset_says_how(tiny_config, tmp_path):
    own = tiny_config("mine", **{"data.captions": str(tmp_path / "caps.csv")})
    assert download.download(own) == own.raw_dir
    assert not own.raw_dir.exists()
    with pytest.raises(CaptionerError) as error:
        download.download(tiny_config("mine"))
    message = str(error.value)
    assert "flickr8k, flickr30k, demo" in message and "captioner clean --dataset mine" in message
