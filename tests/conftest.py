import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
def onnx_cli_build(tmp_path_factory):
    """`python -m svdexport.cli build --backend onnx` of the bundled model (helpers.FAST) as a command, its
    output captured: test_cleanup checks what it prints, test_backends rebuilds (a copy of) its engine."""
    root = tmp_path_factory.mktemp("onnx-cli")
    engine, graphs = root / "e", root / "g"
    cmd = [sys.executable, "-m", "svdexport.cli", "build", "--backend", "onnx", "--out", str(engine),
           "--graphs", str(graphs), *FAST]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return SimpleNamespace(proc=proc, engine=engine, graphs=graphs)
