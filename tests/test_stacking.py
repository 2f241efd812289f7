"""docs/stacking.md's renderer (svdexport/bench/stacking.py) on made-up results: every cell of the table present,
the paired deltas and the derived generation times what their definitions say. (scripts/stacking.py --quick, which
builds ten aoti engines, takes minutes: too slow for the suite.)"""

import math
import re

from svdexport.bench.stacking import BASE, VARIANTS, quality_summary, render, speed_summary

SEEDS = 3


def quality_result(model: str) -> dict:
    # Per-seed values chosen so that the worst paired difference is not the difference of the worst values.
    psnr = {f"{a}-{p}-{c}": [40.0 + i + 3 * j + (c == "full") - 20 * (a == "sparse") for j in range(SEEDS)]
            for i, (a, p) in enumerate(VARIANTS) for c in ("full", "cache")}
    psnr[BASE] = [40.0, 43.0, 46.0]
    psnr["dense-int8-cache"] = [44.0, 41.0, 48.0]  # worst paired: -2 on seed 2; worst against worst: +1
    psnr["fp32-dense-cache"] = [45.0, 44.0, 46.0]
    return {"date": "2026-12-06 12:00 UTC", "model": model, "weights": "bundled:digits", "shapes": {"height": 128},
            "sparse": "sparse:tile=2x2,window=1", "image_pairs_kept": 0.39, "blocks_computed": 0.5, "seeds": [1, 3],
            "steps": 50, "budget": 9, "psnr": psnr, "build_s": {"dense bf16": 20, "dense int8": None},
            "calibration": "the product's defaults", "seconds": 100, "load": [2.0, 3.0], "threads": 1}


def speed_result() -> dict:
    times = {}
    for i, (a, p) in enumerate(VARIANTS):
        times[f"{a}-{p}/full"] = [0.5 - 0.05 * i, 0.4 - 0.05 * i, 0.9]  # median: the middle value
        times[f"{a}-{p}/cached"] = [0.002, 0.003, 0.001]
    return {"date": "2026-12-06 12:10 UTC", "weights": "bundled:flux1-reduced",
            "shapes": {"height": 256, "width": 256, "text_len": 64}, "sparse": "sparse:tile=4x4,window=1",
            "image_pairs_kept": 0.39, "blocks_computed": 0.6, "block_tokens": 16, "times": times,
            "peaks": [1.0e12, 1.2e12], "dense_flops": 3.0e11, "rounds": 3, "cached_calls": 5,
            "gemm": {f"{a}-{p}": "aten" for a, p in VARIANTS}, "build_s": {}, "seconds": 60, "load": [2.5, 2.5],
            "threads": 1}


def test_paired_deltas_are_per_seed_differences_to_the_base_cell():
    r = quality_result("flux")
    s = quality_summary(r)
    assert s[BASE][2:] == (0.0, 0.0)
    for key, vals in r["psnr"].items():
        diffs = [v - b for v, b in zip(vals, r["psnr"][BASE])]
        mean, worst, paired_mean, paired_worst = s[key]
        assert math.isclose(mean, sum(vals) / SEEDS) and worst == min(vals)
        assert math.isclose(paired_mean, mean - s[BASE][0])  # the mean of differences = the difference of means
        assert paired_worst == min(diffs)
    assert s["dense-int8-cache"][3] == -2.0  # paired per seed, not worst against worst (41 - 40)


def test_derived_generation_times_follow_the_step_times():
    r = speed_result()
    s = speed_summary(r, budget=9, steps=50)
    assert math.isclose(s["dense-bf16"]["full_x"], 1.0)
    for a, p in VARIANTS:
        v = s[f"{a}-{p}"]
        full = sorted(r["times"][f"{a}-{p}/full"])[1]
        assert math.isclose(v["full"], full) and math.isclose(v["cached"], 0.002)
        assert math.isclose(v["full_gen"], 50 * full)
        assert math.isclose(v["cache_gen"], 9 * full + 41 * 0.002)
        assert math.isclose(v["cache_x"], s["dense-bf16"]["full_gen"] / v["cache_gen"])
        assert math.isclose(v["of_peak"], 3.0e11 / full / 1.2e12)  # the best peak of the rounds


def test_the_document_has_every_cell_once_with_finite_numbers():
    results = {"env": {"date": "2026-12-06 12:20 UTC", "cpu": "some CPU", "torch": "2.13", "threads": 1, "omp": "1"},
               "not_measured": ["speed-1024: not run"], "quality-flux": quality_result("flux"),
               "quality-hunyuanvideo": quality_result("hunyuanvideo"), "speed-256": speed_result()}
    doc = render(results, "scripts/stacking.py", quick=False)
    table = doc.split("## The table")[1].split("\n## ")[0]
    rows = [ln for ln in table.splitlines() if re.match(r"\| (dense|sparse) \|", ln)]
    assert [tuple(c.strip() for c in ln.split("|")[1:3]) for ln in rows] == \
        [(a, p) for a, p in VARIANTS for _ in ("full", "cache")]
    assert len({ln.split("|")[3] for ln in rows}) == 2  # every step full / SVD-Cache
    for ln in rows:
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", ln)]
        assert len(numbers) == 2 * 2 + 2 and all(math.isfinite(x) for x in numbers)  # 2 models' dB, 1 shape's s, x
    assert "speed-1024: not run" in doc and doc.count("| sparse | int8 |") == 2 + 2 * 2  # the table, 2 per model
