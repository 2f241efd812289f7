"""`svdexport compare`: every method at matched full steps, the paired statistics, the JSON shape and the
written files (slow: they build an engine and sample), and the statistics, seeds and sweeps on their own."""

import json
import statistics

import pytest

from svdexport.bench import methods
from svdexport.bench.compare import _accuracy, _classifier, budgets_of, compare
from svdexport.bench.stats import TIE_DB, paired, parse_seeds, summary
from svdexport.cli import main

FAST = ["--calib-samples", "2", "--calib-steps", "10"]  # the bundled digits model, plans of 10 steps
KEYS = {"method", "backend", "budget", "plan_kind", "plan", "settings", "full_steps", "full_steps_min",
        "full_steps_max", "full_steps_per_sample", "total_steps", "latency_s", "speedup", "psnr_db", "psnr_worst_db",
        "psnr_per_sample", "paired", "ssim", "rel_l2", "class_acc"}
STEPS, BUDGET = 10, 4
PEERS = ["diffusers-taylorseer", "diffusers-fbcache", "cachedit-dbcache"]


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
def test_threshold_peers_report_threshold_and_land_near_the_budget(result):
    for r in result["rows"]:
        if r["plan_kind"] != "threshold":
            continue
        s = r["settings"]
        assert s["threshold"] > 0 and s["sweep_seeds"] == list(methods.SWEEP_SEEDS)
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

    t = methods.sweep_threshold(full_steps, 9, 0.05)
    assert full_steps(t) == 9 and len(calls) <= methods.SWEEP_EXPAND + methods.SWEEP_BISECT + 1
    t = methods.sweep_threshold(lambda t: 30, 9, 0.05)  # out of reach: the nearest count, said by the row
    assert t == 0.05 * 2 ** (methods.SWEEP_EXPAND - 1)
