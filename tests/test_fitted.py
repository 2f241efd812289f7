"""The fitted forecast (predictor svd-fitted): least-squares weights from the plan statistics, their error
table for the DP, the predictor that applies them, and the plan rule around them."""

import dataclasses

import numpy as np
import pytest
import torch

from svdexport.cache import fitted as fit
from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan, forecast_errors, search_table, table_cost
from svdexport.cache.plan_stats import load_stats, save_stats
from svdexport.cache.predictors import SvdTaylor, make_predictor
from svdexport.cache.svd import reconstruct, split
from svdexport.errors import SvdExportError
from svdexport.runtime.plans import plan_for
from svdexport.runtime.scheduler import StepCache
from trajectories import orthonormal, random_walk, trajectory_stats, site_weights_direct


def _direct_cost(traj, bases, plan, weights, table):
    """Runs the runtime's predictor (`Fitted`, built as StepCache builds it) and measures the error."""
    steps = traj.shape[0]
    coeff, res = (make_predictor("svd-fitted", weights={i: tuple(torch.as_tensor(x) for x in w[part])
                                                        for i, w in table.items()}) for part in (0, 1))
    sites, v, cost = site_weights_direct(traj), bases.double(), 0.0
    for i in range(steps):
        if i in plan:
            c, r = split(traj[i], v)
            coeff.update(i, c)
            res.update(i, r)
        else:
            err = (reconstruct(coeff.predict(i), res.predict(i), v) - traj[i]).pow(2).sum(dim=(1, 2, 3)).numpy()
            cost += weights[i] * float((sites * err).sum())
    return cost


def test_table_equals_the_error_of_the_runtime_predictor():
    traj, bases = random_walk(9, seed=2), orthonormal(2, 6, 2, seed=3)
    stats = trajectory_stats(traj, bases)
    w = np.linspace(0.5, 1.5, 9)
    err = fit.errors(stats)
    for plan in ([0, 1, 4], [0, 2, 3, 7], [0, 5], [0, 1, 2, 3, 4, 5, 6, 7, 8]):
        direct = _direct_cost(traj, bases, plan, w, fit.forecast_weights(stats, plan, 9))
        assert table_cost(err, plan, w) == pytest.approx(direct, rel=1e-7, abs=1e-12)


def test_fit_is_never_worse_than_taylor_on_the_calibration_trajectories():
    traj, bases = random_walk(10, seed=5), orthonormal(2, 6, 3, seed=4)
    stats = trajectory_stats(traj, bases)
    fitted, taylor = fit.errors(stats), forecast_errors(stats, 1, 1.0)  # gamma 1: Taylor on both parts
    assert np.all(fitted <= taylor * (1 + 1e-9) + 1e-12)
    assert fitted.sum() < 0.9 * taylor.sum()  # a random walk is no line: the fit learns to damp
    best = search_table(fitted, 4)
    assert best.cost <= search_table(taylor, 4).cost


def test_a_decaying_feature_is_forecast_exactly_where_taylor_overshoots():
    # F_p = 0.7^p F_0: every gap is the same ratio, which two points fit exactly and a line does not.
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(1, 2, 3, 6, generator=g, dtype=torch.float64)
    traj = torch.stack([0.7**p * f0 for p in range(8)])
    stats = trajectory_stats(traj, orthonormal(1, 6, 2))
    fitted, taylor = fit.errors(stats), forecast_errors(stats, 1, 1.0)
    scale = float(traj.pow(2).sum())
    for k, j, i in [(0, 1, 3), (2, 4, 7), (8, 0, 5)]:  # k = 8: only one full step before i
        assert fitted[k, j, i] < 1e-9 * scale < taylor[k, j, i]
    principal, residual = fit.forecast_weights(stats, [0, 2, 4], 8)[3]  # i = 3 from j = 2, k = 0: F_2 and F_0 are
    for a, b in [*zip(principal[0, 0], principal[1, 0]), residual[:, 0]]:  # collinear, so only their
        assert a * 0.7**2 + b == pytest.approx(0.7**3, rel=1e-6)  # combination is fixed: 0.7^3 F_0


def test_taylor_forecast_weights_reproduce_svd_taylor_order_one():
    traj = random_walk(7, seed=1)[:, :1]
    plan, table = [0, 2, 3], fit.taylor_forecast_weights([0, 2, 3], 7, 1)
    for part in (0, 1):  # principal [2, sites, 1] and residual [2, sites] weights alike
        pred = make_predictor("svd-fitted", weights={i: tuple(torch.as_tensor(x) for x in w[part])
                                                     for i, w in table.items()})
        ref = SvdTaylor(1)
        ref.reset()
        for i, f in enumerate(traj):
            if i in plan:
                pred.update(i, f)
                ref.update(i, f)
            else:
                torch.testing.assert_close(pred.predict(i), ref.predict(i), rtol=1e-12, atol=1e-12)


def test_fitted_predictor_refuses_without_weights():
    with pytest.raises(SvdExportError, match="plan statistics"):
        make_predictor("svd-fitted")
    cache = CacheConfig(predictor="svd-fitted").validate()
    with pytest.raises(SvdExportError, match="fitted weights"):
        StepCache(None, None, torch.zeros(1, 4, 2), cache, StepPlan([0, 2], 4))


def test_plan_rule_for_the_fitted_predictor():
    traj, bases = random_walk(10, seed=7), orthonormal(2, 6, 2)
    stats = trajectory_stats(traj, bases)
    cache = CacheConfig(predictor="svd-fitted", full_steps=4).validate()
    ones = lambda steps: np.ones(steps)  # noqa: E731
    plan = plan_for(10, cache, [], stats, ones)
    assert plan.source == "calibrated" and plan.full_steps == search_table(fit.errors(stats), 4, ones(10)).full_steps
    assert set(plan.forecast_weights) == set(range(10)) - set(plan.full_steps)
    assert all(p.shape == (2, 2, 2) and r.shape == (2, 2) for p, r in plan.forecast_weights.values())  # per component
    other = plan_for(20, cache, [], stats, ones)  # not the calibrated count: Taylor's plan and weights, stated
    taylor = plan_for(20, CacheConfig(predictor="svd-taylor", full_steps=4).validate(), [], stats, ones)
    assert "svd-taylor's plan and weights at 20" in other.source and other.full_steps == taylor.full_steps
    expected = fit.taylor_forecast_weights(other.full_steps, 20, 2)
    assert set(other.forecast_weights) == set(expected)
    assert all(np.array_equal(x, y) for i in expected for x, y in zip(other.forecast_weights[i], expected[i]))
    with pytest.raises(SvdExportError, match="plan statistics"):
        plan_for(10, cache, [], None, ones)


def test_component_grams_sum_to_the_principal_gram_and_survive_the_file(tmp_path):
    traj, bases = random_walk(6, seed=3), orthonormal(2, 6, 3, seed=1)
    stats = trajectory_stats(traj, bases)
    assert stats.comp.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(stats.comp.sum(1), stats.proj, rtol=1e-6)  # ||P F||^2 = sum c_n^2 (float32 V)
    save_stats(stats, tmp_path / "s.safetensors")
    np.testing.assert_array_equal(load_stats(tmp_path / "s.safetensors")[0].comp, stats.comp)
    assert trajectory_stats(traj, bases, sketch=16).comp is None  # sketched statistics keep none
    save_stats(trajectory_stats(traj, bases, sketch=16), tmp_path / "old.safetensors")  # as files written before them
    assert load_stats(tmp_path / "old.safetensors")[0].comp is None


def test_statistics_of_several_step_counts_share_one_file(tmp_path):
    bases = orthonormal(2, 6, 3, seed=1)
    own = trajectory_stats(random_walk(6, seed=3), bases)
    other = trajectory_stats(random_walk(9, seed=4, batch=3), bases, sketch=16)  # no component Grams
    save_stats([own, other], tmp_path / "s.safetensors")
    back = load_stats(tmp_path / "s.safetensors")
    assert [b.steps for b in back] == [6, 9] and [b.trajectories for b in back] == [2, 3]
    for a, b in zip([own, other], back):
        for k in ("gram", "cross", "proj"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    np.testing.assert_array_equal(back[0].comp, own.comp)
    assert back[1].comp is None


def _three_rates(steps=8):
    """Features in a 3-D principal subspace whose coefficients go as 0.5^p, 0.9^p and 1.2^p: one pair of
    weights fits two such rates exactly, not three."""
    g = torch.Generator().manual_seed(4)
    bases = orthonormal(1, 6, 3, seed=2)
    c0 = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    rates = torch.tensor([0.5, 0.9, 1.2], dtype=torch.float64)
    traj = torch.stack([(c0 * rates**p) @ bases.double().transpose(-1, -2) for p in range(steps)])
    return traj, bases


def test_components_moving_at_different_rates_get_their_own_weights(monkeypatch):
    traj, bases = _three_rates()
    stats = trajectory_stats(traj, bases)
    part = fit.errors(dataclasses.replace(stats, comp=None, derived={}))
    comp = fit.errors(stats)
    scale = float(traj.pow(2).sum())
    assert np.all(comp <= part * (1 + 1e-9) + 1e-12) and comp[0, 1, 3] < 0.5 * part[0, 1, 3]
    principal, _ = fit.forecast_weights(stats, [0, 1], 8)[3]
    assert principal.shape == (2, 1, 3) and np.abs(principal[:, 0, 0] - principal[:, 0, 2]).max() > 0.01
    old, _ = fit.forecast_weights(dataclasses.replace(stats, comp=None, derived={}), [0, 1], 8)[3]
    assert old.shape == (2, 1, 1)  # statistics without component Grams: one pair for the principal part
    monkeypatch.setattr(fit, "COMPONENT_RIDGE", 1e-9)  # unregularised: two points fit each rate exactly
    assert fit.errors(dataclasses.replace(stats, derived={}))[0, 1, 3] < 1e-9 * scale < part[0, 1, 3]
