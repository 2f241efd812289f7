from svdexport.bench.speedup import measure
from svdexport.cli import main

FAST = ["--calib-samples", "1", "--calib-steps", "4", "--height", "128", "--width", "128", "--text-len", "8"]


def test_speedup_rows_report_plan_ratios_and_quality(tmp_path):
    out = tmp_path / "e"
    assert main(["build", "--out", str(out), "--interval", "4", *FAST]) == 0
    rows = measure(str(out), steps=20, repeats=1, seeds=1, predictors=["svd-taylor", "reuse"])
    assert [r["predictor"] for r in rows] == ["svd-taylor", "reuse"]
    for r in rows:
        assert r["full_steps"] == 3 + 4  # warmup 0-2, then steps 6, 10, 14, 18
        assert r["block_eval_ratio"] == 20 / 7
        assert r["uncached_s"] > 0 and r["cached_s"] > 0
        assert 0 < r["rel_l2"] < 1
