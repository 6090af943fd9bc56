"""The browser tests reuse the tiny runs and their expected captions from tests/test_app.py, and
the tiny attention run from tests/test_attention_views.py."""

from test_app import expected, runs  # noqa: F401  (pytest fixtures)
from test_attention_views import attention_run  # noqa: F401  (a pytest fixture)
