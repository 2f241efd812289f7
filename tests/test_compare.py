"""`svdexport compare`: rows for every method, the JSON shape, and the written files."""

import json

import pytest

from svdexport.bench.compare import _accuracy, _classifier, compare
from svdexport.cli import main

pytestmark = pytest.mark.slow  # engines of every backend or whole pipelines: the full suite only

FAST = ["--calib-samples", "2", "--calib-steps", "10"]
KEYS = {"method", "backend", "full_steps", "total_steps", "latency_s", "speedup", "psnr_db", "ssim", "rel_l2",
        "class_acc"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "e"
    assert main(["build", "--out", str(out), "--interval", "3", *FAST]) == 0
    return out


def test_rows_cover_every_method_and_reference_is_exact(engine):
    result = compare(str(engine), samples=2, steps=10, intervals=(3,), peers=["diffusers-taylorseer"],
                     progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    ref = rows["eager full compute"]
    assert ref["full_steps"] == 10 and ref["psnr_db"] == 99.0 and ref["rel_l2"] == 0 and ref["ssim"] == 1.0
    assert "SVD-Cache svd-taylor o1 (engine)" in rows and "TaylorSeer whole feature o2" in rows
    assert "SVD-Cache ema b0.9 (paper)" in rows and "diffusers-taylorseer" in rows
    classifier, labels = _classifier(), [0, 1]  # samples 0 and 1 ask for digits 0 and 1
    for r in result["rows"]:
        assert KEYS <= set(r)
        key = "reference" if r["interval"] == 1 else f"{r['method']}@{r['interval']}"
        assert r["class_acc"] == _accuracy(classifier, result["images"][key], labels)  # of the method's own images
        if r["method"].startswith("SVD-Cache"):
            assert r["full_steps"] == 3 + 2 and r["psnr_db"] < 99  # warmup 3, then steps 5 and 8
    assert set(result["config"]) >= {"steps", "samples", "intervals", "cache"} and "platform" in result["machine"]


def test_cli_writes_json_markdown_grid_and_frontier(engine, tmp_path, capsys):
    paths = {k: tmp_path / f"c.{ext}" for k, ext in (("json", "json"), ("md", "md"))}
    code = main(["compare", str(engine), "--samples", "2", "--steps", "8", "--intervals", "2,4", "--peers", "none",
                 "--json", str(paths["json"]), "--md", str(paths["md"]), "--grid", str(tmp_path / "g.png"),
                 "--frontier", str(tmp_path / "f.png"), "--docs", str(tmp_path / "docs" / "benchmarks.md")])
    assert code == 0
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"config", "machine", "rows", "temporal"} and {r["interval"] for r in data["rows"]} == {1, 2, 4}
    assert data["temporal"] == {} and all(r["temporal_psnr_db"] is None for r in data["rows"])  # images
    assert "## interval 4" in paths["md"].read_text()
    for png in ("g.png", "f.png", "docs/benchmarks_frontier.png", "docs/benchmarks_grid.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frontier" in (tmp_path / "docs" / "benchmarks.md").read_text()


def test_bad_compare_arguments(engine, capsys):
    assert main(["compare", str(engine), "--intervals", "x"]) == 2
    assert main(["compare", str(engine), "--peers", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("svdexport: error:") for line in err)
