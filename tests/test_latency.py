"""Latency regression tests: ratios measured side by side in one process, compared with stored floors.

    scripts/test.sh -m latency        (CI runs them in the extended tier: scripts/test.sh --extended)

Floors live in tests/baselines/latency.json with the measurement they came from; never absolute times.
"""

import json
import statistics
from pathlib import Path

import pytest

import svdexport
from svdexport.bench.latency import bench
from svdexport.bench.metrics import psnr

pytestmark = [pytest.mark.latency, pytest.mark.slow, pytest.mark.extended]
BASELINE = json.loads((Path(__file__).parent / "baselines" / "latency.json").read_text())


@pytest.fixture(scope="module")
def measured(default_aoti_engine):
    assert BASELINE["backend"] == "aoti"  # the floors are for conftest's default aoti engine
    out = default_aoti_engine
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
