"""Ending a subprocess a test started (a server): asked to stop, then made to."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM `process` (only the one the test started), wait up to `timeout` seconds for it to
    exit, then SIGKILL it: no test leaves a server running or hangs on one that will not stop."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
