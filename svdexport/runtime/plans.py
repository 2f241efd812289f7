"""Which steps of a request run the full graph: the engine's calibrated plan, or the uniform one.

The calibrated plan of the build's step count and budget is stored in the manifest. Another budget at that
step count, or at a step count of `build --plan-steps`, is searched at run time from the plan statistics in
the engine folder (milliseconds). Another step count gets the stated rule: the calibrated plan of that
budget, rescaled to the request's steps (and a fitted forecast falls back to Taylor's weights).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from svdexport.cache import fitted as fit
from svdexport.cache import plan as plans
from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan
from svdexport.cache.plan_stats import PlanStats
from svdexport.cache.predictors import FITTED
from svdexport.errors import SvdExportError
from svdexport.models.family import Sampling, Shapes
from svdexport.runtime.manifest import PlanRecord

# The error model of the plan search forecasts from the last two full steps (order 1) or reuses (order 0).
SEARCH_ORDER = {"svd-taylor": 1, "ema-velocity": 1, "ema": 0, "reuse": 0, "svd-fitted": 1}

StepSizes = Callable[[int], np.ndarray]  # steps -> the schedule's step sizes at that step count


def forecast_kind(predictor: str) -> str:
    """What a plan record was searched for: "fitted" weights (cache/fitted.py) or the Taylor error model."""
    return "fitted" if predictor in FITTED else "taylor"


def search(stats: PlanStats, budget: int, cache: CacheConfig, step_sizes=None) -> plans.Searched:
    """The DP's plan of `budget` full steps for `cache`'s forecast: on the fitted forecast's errors for a
    fitted predictor, else on the Taylor error model of its order and gamma."""
    if cache.predictor in FITTED:
        found = plans.search_table(fit.errors(stats), budget, step_sizes)
        return plans.Searched(found.full_steps, found.cost, 1, cache.gamma)
    return plans.search(stats, budget, SEARCH_ORDER[cache.predictor], cache.gamma, step_sizes)


def cost(stats: PlanStats, full_steps: list[int], cache: CacheConfig, step_sizes=None) -> float:
    """The DP's objective for a given plan under `cache`'s forecast (see `search`)."""
    if cache.predictor in FITTED:
        return plans.table_cost(fit.errors(stats), full_steps, step_sizes)
    return plans.plan_cost(stats, full_steps, SEARCH_ORDER[cache.predictor], cache.gamma, step_sizes)


def plan_for(steps: int, cache: CacheConfig, records: list[PlanRecord], stats: PlanStats | None,
             step_sizes: StepSizes) -> StepPlan:
    """The plan of one request. `step_sizes(steps)` gives the family's schedule's step sizes; `stats` are the
    plan statistics of the request's step count where the build made them. A fitted predictor gets its
    forecast weights for the plan, fitted at the statistics' step count."""
    if cache.predictor not in FITTED:
        return _plan_for(steps, cache, records, stats, step_sizes)
    if stats is None:
        raise SvdExportError(f"predictor {cache.predictor} needs the plan statistics of a build; this engine "
                             "keeps none (rebuild it, or run another predictor)")
    if stats.steps == steps:
        plan = _plan_for(steps, cache, records, stats, step_sizes)
        plan.forecast_weights = fit.forecast_weights(stats, plan.full_steps, steps)
        return plan
    # The stated rule: weights are fitted at the calibrated step count only. Elsewhere run Taylor order 1 on
    # both parts, on Taylor's own plan (rescaled): the fitted plan's long gaps are the fit's, not Taylor's.
    taylor = dataclasses.replace(cache, predictor="svd-taylor", order=1, gamma=1.0)
    plan = _plan_for(steps, taylor, records, stats, step_sizes)
    plan.forecast_weights = fit.taylor_forecast_weights(plan.full_steps, steps, stats.gram.shape[0])
    plan.fallback = (f"{cache.predictor} is fitted for {stats.steps} steps: svd-taylor's plan and weights at {steps} "
                     f"(build with --plan-steps {steps} to fit it there)")
    plan.source += f"; {plan.fallback}"
    return plan


def plan_budget(cache: CacheConfig, steps: int) -> int:
    """Full steps of a calibrated plan of `steps` steps: --full-steps, or as many as the uniform plan of
    warmup and interval has."""
    return min(cache.full_steps or len(StepPlan.uniform(steps, cache.warmup, cache.interval).full_steps), steps)


def _plan_for(steps: int, cache: CacheConfig, records: list[PlanRecord], stats: PlanStats | None,
              step_sizes: StepSizes) -> StepPlan:
    if cache.plan_kind == "uniform" or (stats is None and not records):
        return StepPlan.uniform(steps, cache.warmup, cache.interval)
    budget = plan_budget(cache, steps)
    for r in records:
        if (r.steps == steps and len(r.full_steps) == budget and r.forecast == forecast_kind(cache.predictor)
                and (r.forecast == "fitted" or (r.gamma == cache.gamma and r.order == SEARCH_ORDER[cache.predictor]))):
            # a plan searched for this very forecast
            return StepPlan(list(r.full_steps), steps, "calibrated")
    if stats is None:  # only the recorded plan: map it onto this request
        r = records[0]
        return StepPlan(plans.rescale(r.full_steps, r.steps, steps, budget), steps,
                        f"calibrated for {r.steps} steps, rescaled to {steps}")
    at = stats.steps
    found = search(stats, min(budget, at), cache, step_sizes(at))
    if at == steps:
        return StepPlan(found.full_steps, steps, "calibrated")
    return StepPlan(plans.rescale(found.full_steps, at, steps, budget), steps,
                    f"calibrated for {at} steps, rescaled to {steps}")


def schedule_step_sizes(sampling: Sampling, shapes: Shapes, steps: int) -> np.ndarray:
    """|sigma_{i+1} - sigma_i| of the family's schedule: a feature error on step i enters the latents times it."""
    scheduler = sampling.scheduler()
    sampling.set_timesteps(scheduler, steps, shapes)
    return plans.step_sizes(scheduler.sigmas.double().cpu().numpy())


class Planner:
    """An engine's plan choice: its recorded plans, its plan statistics (at the build's step count and at
    `build --plan-steps`' counts) and its schedule's step sizes, memoised per step count."""

    def __init__(self, records: list[PlanRecord], stats: list[PlanStats], sampling: Sampling, shapes: Shapes):
        self.records, self.sampling, self.shapes = records, sampling, shapes
        self.stats = stats[0] if stats else None  # at the build's step count
        self._stats_by_steps = {st.steps: st for st in stats}
        self._step_sizes: dict[int, np.ndarray] = {}

    def plan(self, steps: int, cache: CacheConfig) -> StepPlan:
        return plan_for(steps, cache, self.records, self.stats_for(steps), self.step_sizes)

    def stats_for(self, steps: int) -> PlanStats | None:
        """The plan statistics of `steps` sampling steps where the build made them, else the build's own."""
        return self._stats_by_steps.get(steps, self.stats)

    def step_sizes(self, steps: int) -> np.ndarray:
        """The schedule's step sizes at `steps` steps, at the build shapes (what the plans were searched with)."""
        if steps not in self._step_sizes:
            self._step_sizes[steps] = schedule_step_sizes(self.sampling, self.shapes, steps)
        return self._step_sizes[steps]
