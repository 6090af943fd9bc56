"""`scripts/bench.py attention` on tiny sizes, so the attention benchmark cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.slow
def test_quick_attention_benchmark_runs_end_to_end(capsys, flickr8k_fixtures, monkeypatch):
    import bench_attention
    import bench_train

    monkeypatch.setattr(bench_train, "FLICKR8K", flickr8k_fixtures / "Flickr8k_text")
    result = bench_attention.main(
        ["--json", "--images", "8", "--grids", "2", "--decode-images", "4", "--rss-images", "8"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["images"] == 8 and result["captions"] == 40
    for key in (
        "epoch_merge_s_2x2",
        "epoch_attention_cpu_s_2x2",
        "breakdown_attention_lstm_cpu_s_2x2",
        "breakdown_projection_cpu_s_2x2",
        "decode_attention_beam3_2x2_ms",
        "decode_merge_greedy_2x2_cpu_ms",
        "peak_rss_mb_30k",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio_2x2"] == pytest.approx(
        result["epoch_attention_s_2x2"] / result["epoch_merge_s_2x2"]
    )
