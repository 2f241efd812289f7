"""`svdexport compare`: every method at matched full steps, the paired statistics, the JSON shape and the
written files (slow: they build an engine and sample), and the statistics, seeds and sweeps on their own."""

import json
import statistics

import pytest

from svdexport.bench import methods, sweep
from svdexport.bench.compare import _accuracy, _classifier, budgets_of, compare
from svdexport.bench.stats import TIE_DB, paired, parse_seeds, summary
from svdexport.cache.plan import search
from svdexport.cli import main

FAST = ["--calib-samples", "2", "--calib-steps", "10"]  # the bundled digits model, plans of 10 steps
KEYS = {"method", "backend", "budget", "plan_kind", "plan", "settings", "full_steps", "full_steps_min",
        "full_steps_max", "full_steps_per_sample", "total_steps", "latency_s", "speedup", "psnr_db", "psnr_worst_db",
        "psnr_per_sample", "paired", "ssim", "rel_l2", "class_acc", "plan_search", "base_method", "best_plan"}
STEPS, BUDGET = 10, 4
PEERS = ["diffusers-taylorseer", "diffusers-fbcache", "cachedit-dbcache", "cachedit-dbcache-taylorseer"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "e"
    assert main(["build", "--out", str(out), *FAST]) == 0  # the default build: calibrated plan
    return out


@pytest.fixture(scope="module")
def result(engine):
    return compare(str(engine), samples=2, steps=STEPS, budgets=(BUDGET,), peers=PEERS, progress=False)


@pytest.mark.slow
def test_every_row_has_full_steps_and_paired_statistics(engine, result):
    import svdexport

    rows = {r["method"]: r for r in result["rows"]}
    ref = rows["eager full compute"]
    assert ref["full_steps"] == STEPS and ref["psnr_db"] == 99.0 and ref["rel_l2"] == 0 and ref["ssim"] == 1.0
    assert ref["paired"] is None and ref["reference"]
    e = svdexport.load(engine)
    want = e.plan(STEPS, e.cache_config(full_steps=BUDGET)).full_steps
    own = rows["SVD-Cache svd-fitted (engine)"]  # the default predictor
    assert own["plan"] == want and own["full_steps"] == len(want) == BUDGET and own["plan_kind"] == "calibrated"
    assert result["config"]["paired_against"] == own["method"] and result["config"]["budgets"] == [BUDGET]
    for name in ("SVD-Cache svd-fitted uniform plan (engine)", "SVD-Cache svd-taylor o1", "SVD-Cache svd-fitted",
                 "TaylorSeer whole feature o1 (calibrated plan)", "TaylorSeer whole feature o2 (uniform plan)",
                 "SVD-Cache ema b0.9 (paper)", "diffusers-taylorseer lite o1 (own plan)", "cachedit-dbcache (same plan)",
                 "diffusers-fbcache (swept threshold)", "cachedit-dbcache (swept threshold)"):
        assert name in rows, name
    assert rows["TaylorSeer whole feature o1 (calibrated plan)"]["plan"] == want  # the plan's gain apart
    assert rows["cachedit-dbcache (same plan)"]["full_steps"] == BUDGET  # the engine's plan, run by cache-dit
    # The fitted weights forecast the residual themselves: no gamma row, and the row says what the weights are.
    assert not any("residual forecast" in name for name in rows)
    assert own["settings"] == {"weights": "least squares on the calibration trajectories"}
    assert rows["SVD-Cache svd-fitted"]["plan"] == want  # the eager twin runs the same plan and weights
    assert own["plan_search"] == "svd-fitted" and rows["SVD-Cache svd-taylor o1"]["plan_search"] == "taylor gamma 1"
    assert rows["SVD-Cache svd-fitted uniform plan (engine)"]["plan_search"] is None
    classifier, labels = _classifier(), [0, 1]  # samples 0 and 1 ask for digits 0 and 1
    base = own["psnr_per_sample"]
    for r in result["rows"]:
        assert KEYS <= set(r), r["method"]
        per = r["psnr_per_sample"]
        assert len(per) == 2 and r["psnr_db"] == pytest.approx(statistics.mean(per)) and r["psnr_worst_db"] == min(per)
        assert r["full_steps_min"] <= r["full_steps"] <= r["full_steps_max"]
        key = "reference" if r["reference"] else f"{r['method']}@{r['budget']}"
        assert r["class_acc"] == _accuracy(classifier, result["images"][key], labels)  # of the method's own images
        if r["reference"]:
            continue
        assert r["budget"] == BUDGET
        if r["plan_kind"] != "threshold":  # static plans: exactly the budget, on every sample
            assert r["full_steps"] == len(r["plan"]) == BUDGET, r["method"]
        p, d = r["paired"], [a - b for a, b in zip(per, base)]
        assert p["against"] == own["method"] and p["n"] == 2
        assert p["diff_mean"] == pytest.approx(statistics.mean(d)) and p["diff_std"] == pytest.approx(statistics.stdev(d))
        assert p["reference_wins"] == sum(x < -TIE_DB for x in d) and p["method_wins"] == sum(x > TIE_DB for x in d)
        assert p["reference_wins"] + p["method_wins"] + p["ties"] == 2
    assert own["paired"]["diff_mean"] == 0 and own["paired"]["ties"] == 2


@pytest.mark.slow
def test_peers_also_run_the_plan_searched_for_their_own_forecast(engine, result):
    """Beside SVD-Cache's plan, TaylorSeer rules run the plan the same DP finds for a Taylor step on the whole
    feature (order 1, gamma 1) and DBCache alone the one for reuse (order 0); each row names the search."""
    import svdexport

    e = svdexport.load(engine)
    rows = {r["method"]: r for r in result["rows"]}
    want = rows["SVD-Cache svd-fitted (engine)"]["plan"]
    sizes = e.step_sizes(STEPS)
    taylor = search(e.plan_stats, BUDGET, 1, 1.0, sizes).full_steps  # the DP itself, not compare's path
    reuse = search(e.plan_stats, BUDGET, 0, 0.0, sizes).full_steps
    cases = [("TaylorSeer whole feature o1", "calibrated plan", taylor, "taylor gamma 1"),
             ("TaylorSeer whole feature o2", "calibrated plan", taylor, "taylor gamma 1"),
             ("cachedit-dbcache-taylorseer o1", "same plan", taylor, "taylor gamma 1"),
             ("cachedit-dbcache-taylorseer o2", "same plan", taylor, "taylor gamma 1"),
             ("cachedit-dbcache", "same plan", reuse, "reuse")]
    for base, same_name, plan, searched in cases:
        own = rows[f"{base} ({'reuse' if searched == 'reuse' else 'Taylor'} plan)"]
        same = rows[f"{base} ({same_name})"]
        assert own["base_method"] == same["base_method"] == base
        assert own["plan"] == plan and own["plan_search"] == searched and own["plan_kind"] == "calibrated", base
        assert same["plan"] == want and same["plan_search"] == "svd-fitted", base
        assert own["full_steps"] == same["full_steps"] == BUDGET, base  # counted in the model: that many ran
        assert (own["plan"] != same["plan"]) == (plan != want)
        if plan != want:  # another plan ran: other images
            assert own["psnr_per_sample"] != same["psnr_per_sample"], base
        if base.startswith("cachedit"):
            assert own["settings"]["steps_computation_mask"] == f"the plan searched for {searched}"
    # Each method on several plans has one best plan per budget: its highest mean.
    groups = {}
    for r in result["rows"]:
        if not r["reference"]:
            groups.setdefault(r["base_method"], []).append(r)
    assert len(groups["TaylorSeer whole feature o1"]) == 3 and len(groups["cachedit-dbcache"]) == 2
    for base, group in groups.items():
        if len(group) == 1:
            assert group[0]["best_plan"] is None, base
            continue
        best = [r for r in group if r["best_plan"]]
        assert len(best) == 1 and best[0]["psnr_db"] == max(r["psnr_db"] for r in group), base
        assert all(r["best_plan"] is False for r in group if r is not best[0])


@pytest.mark.slow
def test_the_held_out_set_is_named_with_its_rule(result):
    from svdexport.bench import report
    from svdexport.bench.stats import HELDOUT_SEEDS

    held = {**result, "config": {**result["config"], "seeds": list(HELDOUT_SEEDS)}}
    assert "held-out set: reported only, never used to choose" in report.markdown(held)
    assert "held-out set" not in report.markdown(result)  # seeds 0-1
    m = result["machine"]
    assert {"cpu", "bf16_units", "cores", "load_average_start", "load_average_end"} <= set(m)


@pytest.mark.slow
def test_threshold_peers_report_threshold_and_land_near_the_budget(result):
    for r in result["rows"]:
        if r["plan_kind"] != "threshold":
            continue
        s = r["settings"]
        assert s["threshold"] > 0 and s["sweep_seeds"] == list(sweep.SWEEP_SEEDS)
        # The sweep lands within one full step on its own samples; on the measured ones each sample decides
        # for itself, so the mean may stray further: the row says how far (mean and range).
        assert abs(s["sweep_full_steps"] - BUDGET) <= 1, (r["method"], s)
        assert abs(r["full_steps"] - BUDGET) <= 2, (r["method"], r["full_steps_per_sample"])


@pytest.mark.slow
def test_cli_writes_json_markdown_and_both_frontiers(engine, tmp_path):
    paths = {k: tmp_path / f"c.{k}" for k in ("json", "md")}
    docs = tmp_path / "docs" / "benchmarks.md"
    code = main(["compare", str(engine), "--seeds", "3-4", "--steps", str(STEPS), "--full-steps", "3",
                 "--intervals", "3", "--peers", "none", "--json", str(paths["json"]), "--md", str(paths["md"]),
                 "--grid", str(tmp_path / "g.png"), "--frontier", str(tmp_path / "f.png"),
                 "--compute", str(tmp_path / "c.png"), "--docs", str(docs)])
    assert code == 0
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"config", "machine", "rows", "temporal", "written_by"}
    assert data["config"]["seeds"] == [3, 4] and data["config"]["budgets"] == [3, 5]  # interval 3: 0 1 2 5 8
    assert {r["budget"] for r in data["rows"]} == {3, 5, STEPS}
    assert data["temporal"] == {} and all(r["temporal_psnr_db"] is None for r in data["rows"])  # images
    md = paths["md"].read_text()
    assert "## 5 of 10 full steps" in md and "PSNR worst" in md and "SVD-Cache wins" in md and "seeds 3-4" in md
    assert "calibrated: svd-fitted" in md and "calibrated: taylor gamma 1" in md and "best plan (highest mean)" in md
    assert "held-out set" not in md and "load average" in md
    for png in ("g.png", "f.png", "c.png", "docs/benchmarks_frontier.png", "docs/benchmarks_compute.png",
                "docs/benchmarks_grid.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    page = docs.read_text()
    assert "benchmarks_compute.png" in page and "benchmarks_frontier.png" in page


@pytest.mark.slow
def test_bad_compare_arguments(engine, capsys):
    for bad in (["--intervals", "x"], ["--full-steps", "9,x"], ["--full-steps", "0"], ["--full-steps", "11"],
                ["--seeds", "a-b"], ["--seeds", "5-1"], ["--peers", "nope"]):
        assert main(["compare", str(engine), "--steps", str(STEPS), *bad]) == 2, bad
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(line.startswith("svdexport: error:") for line in err)


def test_paired_statistics_and_summary():
    p = paired([40.0, 42.0, 39.0, 41.0, 38.0 + TIE_DB / 2], [41.0, 41.0, 39.0, 40.0, 38.0])
    d = [-1, 1, 0, 1, TIE_DB / 2]
    assert p["diff_mean"] == pytest.approx(statistics.mean(d)) and p["diff_std"] == pytest.approx(statistics.stdev(d))
    assert (p["reference_wins"], p["method_wins"], p["ties"], p["n"]) == (1, 2, 2, 5)  # a rounding-size gap ties
    assert summary([40.0, 35.0, 45.0]) == {"mean": 40.0, "worst": 35.0, "std": 5.0}
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_seeds_and_budgets():
    assert parse_seeds("1000-1003") == [1000, 1001, 1002, 1003]
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for bad in ("a", "5-1", "1-"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    # 50 steps, warmup 3: interval 7 -> 9 full steps, 5 -> 12
    assert budgets_of(50, 3, (7, 9), (7, 5)) == [7, 9, 12]
    assert [methods.uniform_interval(50, 3, b) for b in (7, 9, 12)] == [10, 7, 5]


def test_sweep_brackets_then_bisects():
    calls = []

    def full_steps(t):  # a threshold peer: fewer full steps as the threshold rises
        calls.append(t)
        return max(1, round(20 - 30 * t))

    t = sweep.sweep_threshold(full_steps, 9, 0.05)
    assert full_steps(t) == 9 and len(calls) <= sweep.SWEEP_EXPAND + sweep.SWEEP_BISECT + 1
    t = sweep.sweep_threshold(lambda t: 30, 9, 0.05)  # out of reach: the nearest count, said by the row
    assert t == 0.05 * 2 ** (sweep.SWEEP_EXPAND - 1)
