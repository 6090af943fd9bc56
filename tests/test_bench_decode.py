"""`scripts/bench.py decode` on tiny sizes, so the decoding benchmark cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_small_decoding_benchmark_runs_end_to_end(capsys):
    import bench_decode

    result = bench_decode.main(
        ["--json", "--images", "12", "--reference-images", "1", "--vocab", "300"]
        + ["--max-length", "6", "--feature-dim", "32"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["same_captions_as_reference"] is True  # ours decodes what the reference does
    for key in ("greedy_ms", "beam3_ms", "reference_ms", "peak_gflops", "beam3_floor_ms"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["reference_ms"] / result["greedy_ms"])
    assert result["words_per_caption"] == 6
