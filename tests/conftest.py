import os

import pytest

from helpers import TINY_SHAPES, tiny_model

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
