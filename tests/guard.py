"""Proof that a refused or fixed case wrote nothing where it should not: a snapshot of every file
under a root (path -> size and mtime) and the paths that changed outside allowed folders."""

from __future__ import annotations

from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in Path(root).rglob("*")
        if path.is_file()
    }


def changed_outside(root: Path, before: dict, allowed: list[Path] = ()) -> list[str]:
    """Files under `root` added, removed or modified since `before`, outside `allowed` folders."""
    after = snapshot(root)
    inside = [str(Path(folder).resolve().relative_to(Path(root).resolve())) for folder in allowed]
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    return sorted(
        name
        for name in changed
        if not any(name == folder or name.startswith(folder + "/") for folder in inside)
    )
