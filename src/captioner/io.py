"""Small file helpers shared by every stage: atomic writes, JSON, versions, logging."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from captioner.errors import CaptionerError


def log(message: str) -> None:
    """Progress and diagnostics go to stderr (results go to stdout), without breaking tqdm bars."""
    tqdm.write(message, file=sys.stderr)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> Path:
    """Write `value` as JSON atomically; NaN or infinity (not JSON) is refused, nothing written."""
    try:
        text = json.dumps(value, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        where = _non_finite(value)
        if where is None:
            raise
        raise CaptionerError(
            f"{path}: not written, {where} is not a finite number (JSON has no NaN or infinity)"
        ) from None
    atomic_write_bytes(Path(path), (text + "\n").encode())
    return Path(path)


def _non_finite(value: Any, where: str = "the value") -> str | None:
    """Where the first NaN or infinity in a JSON-like value is ("history.2.loss"), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    prefix = "" if where == "the value" else f"{where}."
    for key, item in items:
        found = _non_finite(item, f"{prefix}{key}")
        if found is not None:
            return found
    return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise CaptionerError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno})"
        ) from None
    except UnicodeDecodeError:
        raise CaptionerError(f"{path}: not UTF-8 text") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def names_sha256(names: list[str]) -> str:
    """The sha256 of a list of names, one per line: an image list's fingerprint."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def escapes_folder(name: str) -> bool:
    """True if the relative name `name` (an archive entry, an image in a caption file) would
    resolve outside its folder: absolute, a drive letter, or a `..` part (either separator)."""
    text = name.replace("\\", "/")
    path = PurePosixPath(text)
    return path.is_absolute() or bool(re.match(r"[A-Za-z]:", text)) or ".." in path.parts


def library_versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("captioner", "tensorflow", "keras", "numpy", "pandas", "pillow", "nltk"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the source tree captioner runs from, or "" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def set_seed(seed: int) -> None:
    """One seed for Python, NumPy and TensorFlow (imported lazily: it is slow to import)."""
    import keras

    keras.utils.set_random_seed(seed)
