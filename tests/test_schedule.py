import pytest

from svdexport.cache.config import CacheConfig, step_plan
from svdexport.errors import SvdExportError


@pytest.mark.parametrize("warmup,interval,full", [
    (3, 5, 12), (3, 7, 9), (3, 8, 8),  # FLUX, as the paper reports
    (1, 5, 10), (1, 6, 9),  # HunyuanVideo
    (3, 1, 50),
])
def test_full_step_counts_match_reported_schedules(warmup, interval, full):
    assert sum(step_plan(50, warmup, interval)) == full


def test_plan_positions():
    plan = step_plan(20, 3, 7)
    assert [i for i, f in enumerate(plan) if f] == [0, 1, 2, 9, 16]
    assert step_plan(5, 0, 3) == [True, False, True, False, False]  # step 0 is always full
    assert step_plan(1, 3, 7) == [True]


@pytest.mark.parametrize("kw,msg", [
    ({"tau": 0.0}, "tau"), ({"tau": 1.5}, "tau"), ({"interval": 0}, "interval"), ({"warmup": -1}, "warmup"),
    ({"beta": 1.0}, "beta"), ({"order": 3}, "order"), ({"k_max": 0}, "k_max"),
    ({"predictor": "x"}, "predictor"), ({"granularity": "x"}, "granularity"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(SvdExportError, match=msg):
        CacheConfig(**kw).validate()


def test_steps_must_be_positive():
    with pytest.raises(SvdExportError):
        step_plan(0, 3, 7)
