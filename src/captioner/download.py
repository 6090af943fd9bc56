"""The download stage: fetch a dataset's files with resume and checksums, extract them safely.

After `captioner download --dataset flickr8k`, raw/ holds:

    Flickr8k_Dataset.zip, Flickr8k_text.zip     the archives, md5-verified, kept as downloaded
    Flicker8k_Dataset/, Flickr8k_text/          their contents (loose files get a folder named
                                                after their archive, as Flickr8k_text.zip's do)
    .Flickr8k_Dataset.zip.extracted, ...        written once an archive is fully extracted
    dataset_flickr8k.json                       Karpathy's split, if its (reported dead) link works

A download in progress is `<name>.part`; the next run resumes it with an HTTP Range request. A
file gets its final name only after its checksum matched, so a final name always means complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urlsplit

from tqdm import tqdm

from captioner import __version__
from captioner.config import Config
from captioner.errors import CaptionerError
from captioner.io import atomic_write_bytes, log

# Fallback when cfg.download.urls is empty: (url, md5) per file; "" = the source publishes none.
_FLICKR8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
_FLICKR30K = "https://huggingface.co/datasets/nlphuji/flickr30k/resolve/main"
DATASETS: dict[str, tuple[tuple[str, str], ...]] = {
    "flickr8k": (
        (f"{_FLICKR8K}/Flickr8k_Dataset.zip", "f18a1e2920de5bd84dae7cf08ec78978"),
        (f"{_FLICKR8K}/Flickr8k_text.zip", "bf6c1abcb8e4a833b7f922104de18627"),
    ),
    "flickr30k": (
        (f"{_FLICKR30K}/flickr30k-images.zip", ""),
        (f"{_FLICKR30K}/flickr_annotations_30k.csv", ""),
    ),
}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
CHUNK = 1 << 20  # bytes per read/write while streaming and copying
PERMANENT_HTTP_ERRORS = {400, 401, 403, 404, 410}  # retrying cannot help


def download(cfg: Config) -> Path:
    """Fetch and extract cfg.data.dataset into cfg.raw_dir (demo: generate it); return raw_dir."""
    if cfg.data.dataset == "demo":
        from captioner import demo

        return demo.generate(cfg)
    files = sources(cfg)
    if not files:
        if cfg.data.captions:
            log(f"{cfg.data.dataset}: your own data ({cfg.data.captions}); nothing to download")
            return cfg.raw_dir
        builtin = ", ".join([*DATASETS, "demo"])
        raise CaptionerError(
            f"dataset '{cfg.data.dataset}': no files to download; built-in datasets are {builtin}; "
            f"for your own data run `captioner clean --dataset {cfg.data.dataset} --format csv "
            "--captions FILE.csv --images FOLDER`, or give --set download.urls=[...]"
        )
    for url, md5 in files:
        fetch_and_extract(cfg, url, md5)
    if cfg.data.dataset in DATASETS:
        _fetch_karpathy(cfg)
    return cfg.raw_dir


def sources(cfg: Config) -> list[tuple[str, str]]:
    """(url, md5) of each file: cfg.download.urls, else the built-in table; --mirror applied."""
    urls, sums = cfg.download.urls, cfg.download.md5
    if not urls:
        table = DATASETS.get(cfg.data.dataset, ())
        urls, sums = tuple(url for url, _ in table), tuple(md5 for _, md5 in table)
    if sums and len(sums) != len(urls):
        raise CaptionerError(
            f"config download.md5: {len(sums)} sums for {len(urls)} urls; "
            'give one per url ("" = not verified)'
        )
    if cfg.download.skip_checksum or not sums:
        sums = ("",) * len(urls)
    return [(mirrored(url, cfg.download.mirror), md5) for url, md5 in zip(urls, sums, strict=True)]


def file_name(url: str) -> str:
    """The last path segment of a URL: the name the file gets in raw/ (and on a mirror)."""
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    if not name or name in (".", ".."):
        raise CaptionerError(f"{url}: the URL names no file; give the full URL of each file")
    return name


def mirrored(url: str, mirror: str) -> str:
    """`url` with everything before its file name replaced by `mirror` (unchanged if "")."""
    return f"{mirror.rstrip('/')}/{quote(file_name(url))}" if mirror else url


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def fetch_and_extract(cfg: Config, url: str, md5: str) -> None:
    """One file of a dataset: skipped when in place, else downloaded, verified and extracted."""
    name = file_name(url)
    path, marker = cfg.raw_dir / name, cfg.raw_dir / f".{name}.extracted"
    if marker.is_file() or (path.is_file() and not is_archive(name)):
        log(f"reusing {path}")
        return
    if path.is_file():
        log(f"reusing {path} (extracting it again: the last extraction did not finish)")
    else:
        options = cfg.download
        fetch(
            url,
            path,
            md5,
            retries=options.retries,
            backoff=options.backoff,
            timeout=options.timeout,
        )
    if is_archive(name):
        extract(path, cfg.raw_dir)
        atomic_write_bytes(marker, b"")


def fetch(
    url: str,
    dest: Path,
    md5: str = "",
    retries: int = 4,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming it; verify md5 ("" = don't); retry."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _stream(url, part, timeout)
            break
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets
            if isinstance(error, OSError) and not isinstance(error, URLError) and error.filename:
                raise  # a local file problem (disk full, permissions): retrying can't help
                raise
            reason = error if isinstance(error, HTTPError) else getattr(error, "reason", error)
            permanent = isinstance(error, HTTPError) and error.code in PERMANENT_HTTP_ERRORS
            if permanent or attempt == retries:
                raise CaptionerError(
                    f"{url}: download failed after {attempt + 1} attempt(s) ({reason}); "
                    "run again later to resume, or fetch the same files from elsewhere with "
                    "--mirror URL"
                ) from None
            delay = backoff * 2**attempt
            log(f"{url}: {reason}; retry {attempt + 1} of {retries} in {delay:g} s")
            time.sleep(delay)
    if md5:
        actual = _md5(part)
        if actual != md5.lower():
            part.unlink()  # resuming would only append to bad bytes
            raise CaptionerError(
                f"{dest}: md5 {actual} does not match the expected {md5}; the download was "
                "deleted, run again to fetch it afresh (--skip-checksum if your mirror repackages)"
            )
    os.replace(part, dest)
    return dest


def _stream(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part`; raise ConnectionError if the transfer stops short."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"captioner/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except HTTPError as error:
        if error.code == 416 and have:  # asked past the end: the partial file may be whole
            whole = error.headers.get("Content-Range", "") == f"bytes */{have}"
            error.close()
            if whole:
                return
            part.unlink()
            raise ConnectionError("the server refused to resume; starting over") from None
        raise
    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = (
            bool(have) and response.status == 206 and content_range.startswith(f"bytes {have}-")
        )
        start = have if resumed else 0  # a server that ignores Range sends the whole file
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:  # http.client returns b"" when the peer hangs up
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- extraction -------------------------------------------------------------------------------

Opener = Callable[[], IO[bytes]] | None  # None for a folder entry


@contextlib.contextmanager
def _open_archive(path: Path) -> Iterator[list[tuple[str, Opener]]]:
    """(entry name, opener) for each entry of a zip or tar archive; links and devices refused."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                yield [
                    (
                        info.filename,
                        None if info.is_dir() else functools.partial(archive.open, info),
                    )
                    for info in archive.infolist()
                ]
        else:
            with tarfile.open(path) as archive:
                entries: list[tuple[str, Opener]] = []
                for member in archive.getmembers():
                    if not (member.isfile() or member.isdir()):
                        raise CaptionerError(
                            f"{path}: entry '{member.name}' is a link or device; "
                            "refusing to extract (get the archive elsewhere)"
                        )
                    opener = functools.partial(archive.extractfile, member)
                    entries.append((member.name, opener if member.isfile() else None))
                yield entries
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        raise CaptionerError(
            f"{path}: not a readable archive ({error}); delete it and run "
            "again to download it afresh"
        ) from None


def _inside(name: str, archive: Path) -> PurePosixPath | None:
    """An entry's path relative to the target folder; None for macOS junk; refuses escapes."""
    text = name.replace("\\", "/")
    path = PurePosixPath(text)
    if path.is_absolute() or re.match(r"[A-Za-z]:", text) or ".." in path.parts:
        raise CaptionerError(
            f"{archive}: entry '{name}' would land outside the target folder; "
            "refusing to extract the archive (get it from a trusted source)"
        )
    parts = path.parts
    if not parts or "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store":
        return None
    return path


def archive_stem(name: str) -> str:
    """'Flickr8k_text.zip' -> 'Flickr8k_text'."""
    suffix = next(s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s))
    return name[: -len(suffix)]


def extract(archive: Path, target: Path) -> Path:
    """Extract `archive` under `target`; return the folder its contents went to.

    Every entry is checked before anything is written. An archive whose entries share one
    top-level folder is extracted as is; loose files go to target/<archive stem>/.
    """
    with _open_archive(archive) as entries:
        plan = [
            (inside, opener)
            for name, opener in entries
            if (inside := _inside(name, archive)) is not None
        ]
        tops = {inside.parts[0] for inside, _ in plan}
        one_folder = len(tops) == 1 and any(
            len(inside.parts) > 1 or opener is None for inside, opener in plan
        )
        root = target if one_folder else target / archive_stem(archive.name)
        for inside, opener in tqdm(plan, desc=f"extracting {archive.name}", unit="file"):
            dest = root / inside
            if opener is None:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with opener() as source, open(dest, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
    log(f"extracted {archive.name}: {len(plan)} entries into {root}")
    return root


# --- Karpathy's split -------------------------------------------------------------------------


def _fetch_karpathy(cfg: Config) -> None:
    """raw/dataset_<name>.json from cfg.download.karpathy_url; a failure is only a warning."""
    url = cfg.download.karpathy_url
    wanted = cfg.raw_dir / f"dataset_{cfg.data.dataset}.json"
    if not url or wanted.is_file():
        return
    try:
        # One attempt: the original link is reported dead, and this file is optional.
        archive = cfg.raw_dir / file_name(url)
        if not archive.is_file():
            fetch(url, archive, retries=0, timeout=cfg.download.timeout)
        with _open_archive(archive) as entries:
            opener = next(
                (
                    opener
                    for name, opener in entries
                    if opener and PurePosixPath(name).name == wanted.name
                ),
                None,
            )
            if opener is None:
                raise CaptionerError(f"{archive}: holds no {wanted.name}")
            with opener() as source:
                atomic_write_bytes(wanted, source.read())
        log(f"Karpathy split: {wanted}")
    except CaptionerError as error:
        log(
            f"warning: Karpathy split not available ({error}); the dataset's own split still "
            "works; set download.karpathy_url to another copy of caption_datasets.zip"
        )
