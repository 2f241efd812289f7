import os

import pytest

from helpers import FAST, TINY_SHAPES, tiny_model

# --dtype auto picks bf16 on CPUs with bf16 matrix units: the engines the suite builds must not depend on the
# test machine's CPU, so auto means fp32 here (subprocesses inherit it). test_precision.py tests the rule with
# mocked CPUs; test_latency.py measures the machine's real default.
os.environ.setdefault("SVDEXPORT_CPU_BF16", "0")


@pytest.fixture(params=[False, True], ids=["no-guidance", "guidance"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def shapes():
    return TINY_SHAPES


@pytest.fixture(scope="session")
def default_aoti_engine(tmp_path_factory):
    """`svdexport build --backend aoti` with no other flag and this machine's own --dtype auto: the engine the
    latency floors are for, shared with the tests that need any AOTInductor engine (one build, not two)."""
    from svdexport.cli import main

    out = tmp_path_factory.mktemp("default-aoti") / "engine"
    pinned = os.environ.pop("SVDEXPORT_CPU_BF16", None)  # the shipped default: this machine's own --dtype auto
    try:
        assert main(["build", "--backend", "aoti", "--out", str(out), "--graphs", str(out.parent / "graphs")]) == 0
    finally:
        if pinned is not None:
            os.environ["SVDEXPORT_CPU_BF16"] = pinned
    return out



@pytest.fixture(scope="session")
def fast_aoti_engine(tmp_path_factory):
    """A quick AOTInductor engine of the bundled model (FAST: one calibration sample, 128x128), its exported
    programs in `graphs` beside it: for the tests that need any aoti engine, built once per session."""
    from svdexport.cli import main

    out = tmp_path_factory.mktemp("fast-aoti") / "engine"
    assert main(["build", "--backend", "aoti", "--out", str(out), "--graphs", str(out.parent / "graphs"), *FAST]) == 0
    return out
