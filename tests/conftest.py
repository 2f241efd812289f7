import pytest

from helpers import TINY_SHAPES, tiny_model


@pytest.fixture(params=[False, True], ids=["no-guidance", "guidance"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def shapes():
    return TINY_SHAPES
