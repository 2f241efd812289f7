import pytest

from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan
from svdexport.errors import SvdExportError


@pytest.mark.parametrize("warmup,interval,full", [
    (3, 5, 12), (3, 7, 9), (3, 8, 8),  # FLUX, as the paper reports
    (1, 5, 10), (1, 6, 9),  # HunyuanVideo
    (3, 1, 50),
])
def test_full_step_counts_match_reported_schedules(warmup, interval, full):
    assert len(StepPlan.uniform(50, warmup, interval).full_steps) == full


def test_plan_positions():
    plan = StepPlan.uniform(20, 3, 7)
    assert plan.full_steps == [0, 1, 2, 9, 16] and [i for i, f in enumerate(plan.mask) if f] == plan.full_steps
    assert StepPlan.uniform(5, 0, 3).mask == [True, False, True, False, False]  # step 0 is always full
    assert StepPlan.uniform(1, 3, 7).mask == [True]


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
        StepPlan.uniform(0, 3, 7)


def test_an_engine_of_0_4_0_names_the_plan_kind_plan_and_still_loads(tmp_path_factory):
    """Manifests written before the rename hold `cache.plan`: read as `plan_kind`; new ones write `plan_kind`."""
    import json
    import shutil

    import svdexport
    from helpers import quick_engine
    from svdexport.runtime import manifest as mf

    new = quick_engine(tmp_path_factory, "plan-kind")
    data = json.loads((new / "manifest.json").read_text())
    assert data["cache"]["plan_kind"] == "calibrated" and "plan" not in data["cache"]
    old = new.parent / "old"
    shutil.copytree(new, old)
    del data["cache"]["plan_kind"]
    data["cache"]["plan"] = "uniform"  # not the default: read, not defaulted
    data["manifest_sha256"] = mf._digest(data)
    (old / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    with svdexport.load(old) as e:
        assert e.cache.plan_kind == "uniform" and e.plan(6).source.startswith("uniform")
        assert e.cache_config(plan="calibrated").plan_kind == "calibrated"  # the run-time override's old name too
