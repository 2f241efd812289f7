"""Latency regression tests: ratios measured side by side in one process, compared with stored floors.

    scripts/test.sh -m latency        (they also run in the default suite: about a minute)

Floors live in tests/baselines/latency.json with the measurement they came from; never absolute times.
"""

import json
import os
import statistics
from pathlib import Path

import pytest

import svdexport
from svdexport.bench.latency import bench
from svdexport.bench.metrics import psnr
from svdexport.cli import main

pytestmark = [pytest.mark.latency, pytest.mark.slow]
BASELINE = json.loads((Path(__file__).parent / "baselines" / "latency.json").read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "engine"
    pinned = os.environ.pop("SVDEXPORT_CPU_BF16", None)  # the shipped default: this machine's own --dtype auto
    try:
        assert main(["build", "--backend", BASELINE["backend"], "--out", str(out),
                     "--graphs", str(out.parent / "graphs")]) == 0
    finally:
        if pinned is not None:
            os.environ["SVDEXPORT_CPU_BF16"] = pinned
    report = bench(str(out), steps=50, repeats=3, step_calls=5, e2e_repeats=5)
    engine = svdexport.load(out)
    eager = engine.eager_reference()
    scores = []
    for seed in range(4):
        x = engine.example_inputs(seed)
        scores.append(psnr(engine.generate(x, steps=50).latents, eager.generate(x, steps=50, interval=1).latents))
    return {"speedup": report["ratios"]["e2e_speedup_vs_eager_uncached"], "psnr_db": statistics.mean(scores)}


def test_engine_with_cache_speedup_over_eager_full_compute(measured):
    floor = BASELINE["floors"]["speedup"]
    assert measured["speedup"] >= floor, f"measured {measured['speedup']:.2f}x, floor {floor}x"


def test_engine_with_cache_quality_against_full_compute(measured):
    floor = BASELINE["floors"]["psnr_db"]
    assert measured["psnr_db"] >= floor, f"measured {measured['psnr_db']:.2f} dB, floor {floor} dB"
