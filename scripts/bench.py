#!/usr/bin/env python
"""Benchmarks: ours against a faithful re-implementation of the reference approach, same run.

    python scripts/bench.py features [--json]
    python scripts/bench.py train [--json]
    python scripts/bench.py attention [--json]   the attention decoder against merge
    python scripts/bench.py decode [--json]
    python scripts/bench.py quality [--json]   caption quality on real photographs (dev split)
    python scripts/bench.py serve [--json]     captioner serve under load, batching on vs off
    python scripts/bench.py export --run RUN [--json]   exported models: size, latency, captions

Each subcommand lives in scripts/bench_<name>.py and exposes `main(argv) -> dict`.
Results are recorded in BENCHMARKS.md together with the machine they ran on.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

COMMANDS = ("features", "train", "attention", "decode", "quality", "serve", "export")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: bench.py {{{'|'.join(COMMANDS)}}} [--json] [options]")
    importlib.import_module(f"bench_{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
