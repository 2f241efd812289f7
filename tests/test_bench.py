import pytest

from helpers import FAST
from svdexport.bench.speedup import measure
from svdexport.cli import main

pytestmark = pytest.mark.slow  # engines of every backend or whole pipelines: the full suite only


def test_speedup_rows_report_plan_ratios_and_quality(tmp_path):
    out = tmp_path / "e"
    assert main(["build", "--out", str(out), "--interval", "4", *FAST]) == 0
    rows = measure(str(out), steps=20, repeats=1, seeds=1, predictors=["svd-taylor", "reuse"])
    assert [r["predictor"] for r in rows] == ["svd-taylor", "reuse"]
    for r in rows:
        assert r["full_steps"] == 3 + 4  # warmup 0-2, then steps 6, 10, 14, 18
        assert r["block_eval_ratio"] == 20 / 7
        # One timing per engine, shared by its rows; the ratio is the ratio of the two medians.
        assert (r["uncached_s"], r["cached_s"]) == (rows[0]["uncached_s"], rows[0]["cached_s"])
        assert r["wall_ratio"] == pytest.approx(r["uncached_s"] / r["cached_s"])
        assert 0 < r["rel_l2"] < 1
