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

import hashlib
import http.client
import os
import re
import time
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urlsplit

from tqdm import tqdm

from captioner import __version__
from captioner.archive import CHUNK, Limits, extract, is_archive, open_archive
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


def downloadable(cfg: Config) -> bool:
    """True when `download` has something to fetch or draw for this dataset."""
    return cfg.data.dataset == "demo" or bool(cfg.download.urls or DATASETS.get(cfg.data.dataset))


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
    """The last path segment of a URL: the name the file gets in raw/ (and on a mirror).

    Only a plain base name survives: an escaped separator (`..%2Fx.zip`) is cut at the last one
    and control characters are dropped, so the file always lands in raw/ itself."""
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    name = "".join(ch for ch in re.split(r"[/\\]", segment)[-1] if ch.isprintable()).strip()
    if not name or name.startswith("."):
        raise CaptionerError(f"{url}: the URL names no file; give the full URL of each file")
    return name


def mirrored(url: str, mirror: str) -> str:
    """`url` with everything before its file name replaced by `mirror` (unchanged if "")."""
    return f"{mirror.rstrip('/')}/{quote(file_name(url))}" if mirror else url


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
        fetch(url, path, md5, **transfer_options(cfg))
    if is_archive(name):
        extract(path, cfg.raw_dir, limits(cfg))
        atomic_write_bytes(marker, b"")


def transfer_options(cfg: Config) -> dict[str, float]:
    """fetch's retry, timeout and stall settings from cfg.download."""
    options = cfg.download
    return {
        "retries": options.retries,
        "backoff": options.backoff,
        "timeout": options.timeout,
        "stall_seconds": options.stall_seconds,
        "min_speed": options.min_speed,
    }


def limits(cfg: Config) -> Limits:
    return Limits(cfg.download.max_extract_bytes, cfg.download.max_extract_ratio)


def fetch(
    url: str,
    dest: Path,
    md5: str = "",
    retries: int = 4,
    backoff: float = 2.0,
    timeout: float = 60.0,
    stall_seconds: float = 60.0,
    min_speed: float = 1024.0,
) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming it; verify md5 ("" = don't); retry.

    A transfer slower than `min_speed` bytes/s over any `stall_seconds` counts as stalled: it
    is cut and resumed like a dropped connection (a per-read timeout alone never fires when a
    server sends one byte now and then)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _stream(url, part, timeout, stall_seconds, min_speed)
            break
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets
            if isinstance(error, OSError) and not isinstance(error, URLError) and error.filename:
                raise  # a local file problem (disk full, permissions): retrying can't help
            reason = error if isinstance(error, HTTPError) else getattr(error, "reason", error)
            if isinstance(error, HTTPError) and error.code in PERMANENT_HTTP_ERRORS:
                raise CaptionerError(
                    f"{url}: HTTP {error.code} {error.reason} (not retried: the server has no "
                    "such file for us); check the URL, or fetch the same file names from another "
                    f"server with --mirror URL (which downloads URL/{dest.name})"
                ) from None
            if attempt == retries:
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


def _stream(url: str, part: Path, timeout: float, stall_seconds: float, min_speed: float) -> None:
    """Append the rest of `url` to `part`; raise ConnectionError if the transfer stops short
    or stalls (under `min_speed` bytes/s over `stall_seconds`)."""
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
            window_start, window_bytes = time.monotonic(), 0
            while chunk := response.read1(CHUNK):  # what has arrived, not a full CHUNK
                out.write(chunk)
                bar.update(len(chunk))
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= stall_seconds:
                    if window_bytes < min_speed * elapsed:
                        raise ConnectionError(
                            f"stalled: {window_bytes} bytes in {elapsed:.0f} s, under "
                            f"download.min_speed = {min_speed:g} bytes/s"
                        )
                    window_start, window_bytes = time.monotonic(), 0
    size = part.stat().st_size
    if total is not None and size < total:  # http.client returns b"" when the peer hangs up
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


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
            fetch(url, archive, **{**transfer_options(cfg), "retries": 0})
        with open_archive(archive) as entries:
            opener, size = next(
                (
                    (entry.opener, entry.size)
                    for entry in entries
                    if entry.opener and PurePosixPath(entry.name).name == wanted.name
                ),
                (None, 0),
            )
            if opener is None:
                raise CaptionerError(f"{archive}: holds no {wanted.name}")
            if size > limits(cfg).max_bytes:
                raise CaptionerError(f"{archive}: {wanted.name} is over download.max_extract_bytes")
            with opener() as source:
                atomic_write_bytes(wanted, source.read())
        log(f"Karpathy split: {wanted}")
    except CaptionerError as error:
        log(
            f"warning: Karpathy split not available ({error}); the dataset's own split still "
            "works; set download.karpathy_url to another copy of caption_datasets.zip"
        )
