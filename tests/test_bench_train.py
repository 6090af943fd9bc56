"""`scripts/bench.py train --quick` on tiny sizes, so the training benchmark cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.slow
def test_quick_training_benchmark_runs_end_to_end(capsys, flickr8k_fixtures, monkeypatch):
    import bench_train

    monkeypatch.setattr(bench_train, "FLICKR8K", flickr8k_fixtures / "Flickr8k_text")
    result = bench_train.main(
        ["--quick", "--json", "--images", "8", "--reference-batches", "1", "--rss-images", "8"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["images"] == 8 and result["captions"] == 40
    assert result["vocab_reference"] > 8000 > result["vocab_default"]  # full vs min_count words
    for key in (
        "reference_s",
        "ours_s",
        "ours_same_function_s",
        "floor_s",
        "peak_rss_mb_30k",
        "breakdown_projection_s",
        "breakdown_rnn_s",
        "val_loss_bfloat16",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio_default"] == pytest.approx(result["reference_s"] / result["ours_s"])
    assert result["rss_images"] == 8 and result["peak_rss_mb_30k"] < result["peak_rss_mb_bench"]
