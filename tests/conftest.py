"""Shared test fixtures: paths to the real Flickr8k fixture files and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loopback import Server

from captioner.config import Config, load_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(
    os.environ.get(
        "CAPTIONER_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    )
)
FLICKR8K = FIXTURES / "flickr8k"


@pytest.fixture(scope="session")
def flickr8k_fixtures() -> Path:
    """../shared/fixtures/flickr8k: real caption files, official splits and 24 real images."""
    if not (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        pytest.fail(f"fixtures not found at {FLICKR8K}; set CAPTIONER_FIXTURES")
    return FLICKR8K


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
