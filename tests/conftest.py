"""Shared test fixtures: Flickr8k-layout files (synthetic everywhere, real when beside us), tiny
configs.

Tests needing the real Flickr8k files read them from $CAPTIONER_SHARED/fixtures/flickr8k
(default: ../shared beside the repository) and skip, saying so, where they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loopback import Server
from tinydata import write_flickr8k_like

from captioner.config import Config, load_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The one convention (scripts/bench_*.py use it too): CAPTIONER_SHARED holds fixtures/ and
# real-flickr8k/; by default the ../shared folder beside the repository.
SHARED = Path(os.environ.get("CAPTIONER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FLICKR8K = SHARED / "fixtures" / "flickr8k"


@pytest.fixture(scope="session")
def flickr8k_fixtures() -> Path:
    """$CAPTIONER_SHARED/fixtures/flickr8k: real caption files, official splits, 24 real images."""
    if not (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        pytest.skip(
            f"needs the real Flickr8k fixtures, not found at {FLICKR8K}: "
            "set CAPTIONER_SHARED=DIR with DIR/fixtures/flickr8k (see tests/conftest.py)"
        )
    return FLICKR8K


@pytest.fixture(scope="session")
def flickr8k_like(tmp_path_factory) -> Path:
    """A synthetic folder in the fixtures' layout (tinydata.LIKE_SIZES images), made anywhere."""
    return write_flickr8k_like(tmp_path_factory.mktemp("flickr8k-like"))


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Build a Config rooted in tmp_path; keyword args are dotted overrides."""

    def make(dataset: str = "demo", **dotted) -> Config:
        flags = {"data.data_dir": str(tmp_path / "data"), "train.runs_dir": str(tmp_path / "runs")}
        flags.update(dotted)
        return load_config(None, (), dataset=dataset, **flags)

    return make


@pytest.fixture
def server():
    """A loopback HTTP server (tests/loopback.py), shut down after the test."""
    running = Server()
    yield running
    running.close()
