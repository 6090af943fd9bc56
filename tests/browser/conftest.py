"""The browser test reuses the tiny runs and their expected captions from tests/test_app.py."""

from test_app import expected, runs  # noqa: F401  (pytest fixtures)
