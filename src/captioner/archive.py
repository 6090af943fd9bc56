"""Safe extraction of downloaded archives (zip, tar, tar.gz) into raw/.

Every entry is checked before anything is written: no entry may land outside the target folder
(absolute names, `..`, drive letters), tar links and devices are refused, and the archive's total
uncompressed size must stay under `download.max_extract_bytes`, its expansion ratio under
`download.max_extract_ratio` and within the free disk space (a zip bomb is refused, not
extracted). The bytes actually written are counted too, so an entry cannot exceed its size.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from captioner.config import DownloadConfig
from captioner.errors import CaptionerError
from captioner.io import escapes_folder, log

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
CHUNK = 1 << 20  # bytes per read/write while copying
GIB = 1 << 30

Opener = Callable[[], IO[bytes]] | None  # None for a folder entry


@dataclass(frozen=True)
class Entry:
    name: str
    size: int  # uncompressed bytes, as the archive declares them
    opener: Opener


@dataclass(frozen=True)
class Limits:
    """Caps on what one archive may expand to (config download.max_extract_*)."""

    max_bytes: int
    max_ratio: float

    @classmethod
    def default(cls) -> Limits:
        return cls(DownloadConfig.max_extract_bytes, DownloadConfig.max_extract_ratio)


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    """'Flickr8k_text.zip' -> 'Flickr8k_text'."""
    suffix = next(s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s))
    return name[: -len(suffix)]


@contextlib.contextmanager
def open_archive(path: Path) -> Iterator[list[Entry]]:
    """The entries of a zip or tar archive; links and devices refused."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                yield [
                    Entry(
                        info.filename,
                        info.file_size,
                        None if info.is_dir() else functools.partial(archive.open, info),
                    )
                    for info in archive.infolist()
                ]
        else:
            with tarfile.open(path) as archive:
                entries: list[Entry] = []
                for member in archive.getmembers():
                    if not (member.isfile() or member.isdir()):
                        raise CaptionerError(
                            f"{path}: entry '{member.name}' is a link or device; "
                            "refusing to extract (get the archive elsewhere)"
                        )
                    opener = functools.partial(archive.extractfile, member)
                    entries.append(
                        Entry(member.name, member.size, opener if member.isfile() else None)
                    )
                yield entries
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        raise CaptionerError(
            f"{path}: not a readable archive ({error}); delete it and run "
            "again to download it afresh"
        ) from None


def _inside(name: str, archive: Path) -> PurePosixPath | None:
    """An entry's path relative to the target folder; None for macOS junk; refuses escapes."""
    if escapes_folder(name):
        raise CaptionerError(
            f"{archive}: entry '{name}' would land outside the target folder; "
            "refusing to extract the archive (get it from a trusted source)"
        )
    path = PurePosixPath(name.replace("\\", "/"))
    parts = path.parts
    if not parts or "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store":
        return None
    return path


def _check_size(archive: Path, target: Path, total: int, limits: Limits) -> None:
    """Refuse an archive that expands beyond the caps or the free disk space."""
    packed = max(archive.stat().st_size, 1)
    if total > limits.max_bytes or total / packed > limits.max_ratio:
        raise CaptionerError(
            f"{archive}: expands to {total / GIB:.2f} GiB, {total / packed:.0f} times its size "
            f"(limits: download.max_extract_bytes = {limits.max_bytes / GIB:.2f} GiB, "
            f"download.max_extract_ratio = {limits.max_ratio:g}); refusing to extract it "
            "(a zip bomb?), or raise the limits if you trust it"
        )
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if total > free:
        raise CaptionerError(
            f"{archive}: extracting needs {total / GIB:.2f} GiB but {existing} has only "
            f"{free / GIB:.2f} GiB free; free some space and run again"
        )


def _copy(source: IO[bytes], dest: Path, budget: int, archive: Path) -> int:
    """Copy at most `budget` bytes; an entry that holds more than it declared is refused."""
    written = 0
    with open(dest, "wb") as out:
        while block := source.read(CHUNK):
            written += len(block)
            if written > budget:
                raise CaptionerError(
                    f"{archive}: entry '{dest.name}' holds more than the archive declares; "
                    "refusing to extract it (a damaged archive or a zip bomb)"
                )
            out.write(block)
    return written


def extract(archive: Path, target: Path, limits: Limits | None = None) -> Path:
    """Extract `archive` under `target`; return the folder its contents went to.

    Every entry is checked before anything is written. An archive whose entries share one
    top-level folder is extracted as is; loose files go to target/<archive stem>/.
    """
    with open_archive(archive) as entries:
        plan = [
            (inside, entry)
            for entry in entries
            if (inside := _inside(entry.name, archive)) is not None
        ]
        total = sum(entry.size for _, entry in plan if entry.opener is not None)
        _check_size(archive, target, total, limits or Limits.default())
        tops = {inside.parts[0] for inside, _ in plan}
        one_folder = len(tops) == 1 and any(
            len(inside.parts) > 1 or entry.opener is None for inside, entry in plan
        )
        root = target if one_folder else target / archive_stem(archive.name)
        budget = total
        for inside, entry in tqdm(plan, desc=f"extracting {archive.name}", unit="file"):
            dest = root / inside
            if entry.opener is None:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with entry.opener() as source:
                budget -= _copy(source, dest, budget, archive)
    log(f"extracted {archive.name}: {len(plan)} entries into {root}")
    return root
