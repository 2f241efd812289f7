"""Calibrated step plans: Gram-based errors, the exact DP, the residual forecast and the uniform plan."""

import itertools

import numpy as np
import pytest
import torch

from svdexport.cache.plan import (StepPlan, calibrate_gamma, forecast_errors, plan_cost, refine, search,
                                  site_weights, table_cost)
from svdexport.cache.predictors import ResidualForecast, SvdTaylor, damped_taylor
from svdexport.cache.svd import reconstruct, split
from trajectories import orthonormal, random_walk, trajectory_stats, site_weights_direct


def _direct_cost(traj, bases, plan, gamma, weights, order=1):
    """Runs the runtime's own predictor math (SvdTaylor + ResidualForecast) and measures the error."""
    sites = site_weights_direct(traj)
    coeff_pred, res_pred = SvdTaylor(order), ResidualForecast(gamma)
    coeff_pred.reset()
    cost = 0.0
    v = bases.double()
    for i, f in enumerate(traj):
        if i in plan:
            c, r = split(f, v)
            coeff_pred.update(i, c)
            res_pred.update(i, r)
        else:
            f_hat = reconstruct(coeff_pred.predict(i), res_pred.predict(i), v)
            err = (f_hat - f).pow(2).sum(dim=(1, 2, 3)).numpy()
            cost += weights[i] * float((sites * err).sum())
    return cost


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_gram_error_equals_direct_error(gamma):
    traj, bases = random_walk(8), orthonormal(2, 6, 2)
    stats = trajectory_stats(traj, bases)
    np.testing.assert_allclose(site_weights(stats), site_weights_direct(traj), rtol=1e-12)
    w = np.linspace(0.5, 1.5, 8)
    for plan in ([0, 1, 4], [0, 2, 3, 7], [0, 5]):
        direct = _direct_cost(traj, bases, plan, gamma, w)
        assert plan_cost(stats, plan, 1, gamma, w) == pytest.approx(direct, rel=1e-9)


def test_sketch_approximates_the_exact_errors():
    traj, bases = random_walk(8, tokens=16, dim=32), orthonormal(2, 32, 4)
    exact = forecast_errors(trajectory_stats(traj, bases), 1, 0.5)
    sketched = forecast_errors(trajectory_stats(traj, bases, sketch=4096), 1, 0.5)
    mask = exact > 0
    assert np.median(np.abs(sketched[mask] / exact[mask] - 1)) < 0.05


def test_dp_equals_brute_force():
    steps, budget = 10, 4
    traj, bases = random_walk(steps, seed=3), orthonormal(2, 6, 3, seed=1)
    stats = trajectory_stats(traj, bases)
    w = np.random.default_rng(0).uniform(0.2, 1.0, steps)
    for order, gamma in [(1, 0.0), (1, 0.5), (0, 0.0)]:
        brute = min(
            (plan_cost(stats, [0, *rest], order, gamma, w), [0, *rest])
            for rest in itertools.combinations(range(1, steps), budget - 1)
        )
        best = search(stats, budget, order, gamma, w)
        assert len(best.full_steps) == budget and best.full_steps[0] == 0
        assert best.cost == pytest.approx(brute[0], rel=1e-9)
        assert plan_cost(stats, best.full_steps, order, gamma, w) == pytest.approx(brute[0], rel=1e-9)


def test_full_budget_and_one_step():
    traj, bases = random_walk(6), orthonormal(2, 6, 2)
    stats = trajectory_stats(traj, bases)
    assert search(stats, 6).full_steps == list(range(6)) and search(stats, 6).cost == 0.0
    assert search(stats, 1).full_steps == [0]


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_kink_gets_a_full_step(gamma):
    """Piecewise-linear principal motion with a kink at step 13 (the residual is constant, exact under reuse
    too). A linear forecast is exact on a cached step only when it and its two last full steps lie on one
    piece, so a zero-error plan must cover the kink: full steps on it or right after it. Several plans of
    zero cost exist (e.g. 0 1 13 14 and 0 1 14 15), and which one the DP returns is a tie broken by rounding
    (it differs between CPUs), so the test checks the property of every zero-cost plan, not one plan."""
    steps, kink, dim, k = 30, 13, 8, 3
    bases = orthonormal(1, dim, k, seed=2)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1, 1, 4, dim, generator=g, dtype=torch.float64)
    b, c = (torch.randn(1, 1, 4, k, generator=g, dtype=torch.float64) @ bases.double().transpose(1, 2).unsqueeze(1)
            for _ in range(2))
    traj = torch.stack([a + i * b if i <= kink else a + kink * b + (i - kink) * c for i in range(steps)])
    stats = trajectory_stats(traj, bases)
    w = np.abs(np.diff(np.linspace(1.0, 0.0, steps + 1) ** 1.5))
    scale = plan_cost(stats, StepPlan.uniform(steps, 1, 9).full_steps, 1, gamma, w)
    pieces = [{0} if i < kink else {1} if i > kink else {0, 1} for i in range(steps)]

    def covers(plan):  # every cached step extrapolated from two full steps of its own piece
        for i in set(range(steps)) - set(plan):
            last = [f for f in plan if f < i][-2:]
            if len(last) < 2 or not pieces[i] & pieces[last[0]] & pieces[last[1]]:
                return False
        return True

    best = search(stats, 4, 1, gamma, w)
    assert len(best.full_steps) == 4 and best.full_steps[0] == 0
    assert best.cost < 1e-9 * scale and plan_cost(stats, best.full_steps, 1, gamma, w) < 1e-9 * scale
    assert covers(best.full_steps) and kink + 1 in best.full_steps
    # Every plan of the budget: zero cost exactly where the kink is covered (so the DP's is a true optimum).
    zero, err = [], forecast_errors(stats, 1, gamma)
    for rest in itertools.combinations(range(1, steps), 3):
        plan = [0, *rest]
        cost = table_cost(err, plan, w)
        assert (cost < 1e-9 * scale) == covers(plan), (plan, cost / scale)
        zero += [plan] if covers(plan) else []
    assert len(zero) >= 2 and best.full_steps in zero


def test_refine_reaches_the_best_plan_from_a_worse_start():
    """Closed-loop refinement on a score it can only query: with the (negated) forecast error as the score
    it climbs from the uniform plan to the exact optimum the DP finds, keeping step 0 and the budget."""
    steps, budget = 12, 4
    traj, bases = random_walk(steps, seed=3), orthonormal(2, 6, 3, seed=1)
    stats = trajectory_stats(traj, bases)
    calls = []

    def score(plan):
        calls.append(plan)
        assert plan[0] == 0 and len(plan) == budget and plan == sorted(set(plan)) and plan[-1] < steps
        return -plan_cost(stats, plan, 1, 0.0)

    start = [0, 1, 6, 11]
    found = refine([start], steps, score)
    assert found.full_steps == search(stats, budget, 1, 0.0).full_steps
    assert found.score == pytest.approx(-search(stats, budget, 1, 0.0).cost, rel=1e-9)
    assert found.score > score(start) and found.evaluations == len({tuple(p) for p in calls[:-1]})
    # The best start wins; a plan that no move improves comes back as it is.
    optimum = found.full_steps
    again = refine([start, optimum], steps, score)
    assert again.full_steps == optimum and again.score == found.score
    # A local search: from a far start it may stop short of the optimum, but never below its start and
    # only where no single move of one full step by up to 3 improves.
    stuck = refine([[0, 9, 10, 11]], steps, score)
    assert stuck.score >= score([0, 9, 10, 11])
    for i, d in itertools.product(range(1, budget), (-3, -2, -1, 1, 2, 3)):
        moved = stuck.full_steps[:i] + [stuck.full_steps[i] + d] + stuck.full_steps[i + 1:]
        if 0 < moved[i] < steps and len(set(moved)) == budget:
            assert score(sorted(moved)) <= stuck.score
    with pytest.raises(ValueError):
        refine([[0, 1], [0, 1, 2]], steps, score)


@pytest.mark.parametrize("seed", range(3, 8))
def test_refine_with_tail_moves_escapes_where_single_moves_stop(seed):
    """Shifting a full step together with all later ones (the build's setting) reaches the exact optimum
    from both ends of the schedule on these trajectories; single moves stop short on most of them."""
    steps, budget = 12, 4
    stats = trajectory_stats(random_walk(steps, seed=seed), orthonormal(2, 6, 3, seed=1))
    best = search(stats, budget, 1, 0.0)
    for start in ([0, 1, 2, 3], [0, 9, 10, 11]):
        found = refine([start], steps, lambda p: -plan_cost(stats, p, 1, 0.0), tails=True)
        assert found.full_steps == best.full_steps and found.score == pytest.approx(-best.cost, rel=1e-9)


def test_refine_stops_at_its_evaluation_cap():
    scored = []
    found = refine([[0, 1, 2, 3]], 40, lambda p: scored.append(p) or sum(p), max_evaluations=7)
    assert len(scored) == found.evaluations == 7 and found.score == sum(found.full_steps) > 6


def test_gamma_zero_is_reuse_exactly():
    r_prev, r_last = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert damped_taylor(r_last, 5, r_prev, 2, 7, 0.0) is r_last
    f = ResidualForecast(0.0)
    f.update(0, r_prev)
    f.update(3, r_last)
    assert torch.equal(f.predict(5), r_last)
    f = ResidualForecast(0.5)
    f.update(0, r_prev)
    assert torch.equal(f.predict(2), r_prev)  # one full step so far: nothing to extrapolate
    f.update(3, r_last)
    torch.testing.assert_close(f.predict(5), r_last + 0.5 * 2 / 3 * (r_last - r_prev))


def test_calibrated_gamma_is_no_worse_than_reuse_or_whole_feature():
    traj, bases = random_walk(12, seed=4), orthonormal(2, 6, 2)
    stats = trajectory_stats(traj, bases)
    best = calibrate_gamma(stats, 4)
    assert best.cost <= min(best.costs[0.0], best.costs[1.0]) + 1e-12
    fixed = calibrate_gamma(stats, 4, plan=[0, 1, 5, 9])
    assert fixed.full_steps == [0, 1, 5, 9] and fixed.cost == min(fixed.costs.values())


@pytest.mark.parametrize("steps,warmup,interval", [(50, 3, 7), (50, 3, 5), (50, 1, 6), (4, 1, 2), (28, 0, 4),
                                                   (10, 0, 1), (1, 3, 7)])
def test_a_step_plan_is_its_full_steps_and_their_mask(steps, warmup, interval):
    plan = StepPlan.uniform(steps, warmup, interval)
    assert plan.steps == steps and plan.full_steps[0] == 0 and plan.full_steps == sorted(set(plan.full_steps))
    assert plan.full_steps == [i for i, full in enumerate(plan.mask) if full] and len(plan.mask) == steps
    assert StepPlan(list(reversed(plan.full_steps)), steps).full_steps == plan.full_steps  # kept sorted


@pytest.mark.parametrize("full_steps,steps", [([1, 2], 4), ([], 3), ([0, 4], 4)])
def test_a_step_plan_starts_with_a_full_step_and_stays_in_range(full_steps, steps):
    with pytest.raises(ValueError, match="must start with a full step"):
        StepPlan(full_steps, steps)


def test_rescale_keeps_step_zero_the_budget_and_the_schedule_fractions():
    from svdexport.cache.plan import rescale

    plan = [0, 2, 4, 10, 18, 26, 35, 42, 47]
    for steps in (4, 9, 20, 30, 50, 100):
        got = rescale(plan, 50, steps, budget=min(9, steps))
        assert got[0] == 0 and got == sorted(set(got)) and got[-1] < steps and len(got) == min(9, steps)
    assert rescale(plan, 50, 100) == [2 * f for f in plan]  # a multiple of the steps: exact fractions
    assert rescale(plan, 50, 50) == plan
