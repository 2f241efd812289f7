"""Which steps of a request run the full graph: the engine's calibrated plan, or the uniform one.

The calibrated plan of the build's step count and budget is stored in the manifest. Another budget at that
step count, or at a step count of `build --plan-steps`, is searched at run time from the plan statistics in
the engine folder (milliseconds). Another step count gets the stated rule: the calibrated plan of that
budget, rescaled to the request's steps (and a fitted forecast falls back to Taylor's weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from svdexport.cache import fitted as fit
from svdexport.cache import plan as plans
from svdexport.cache.plan_stats import PlanStats
from svdexport.cache.config import CacheConfig
from svdexport.cache.predictors import FITTED
from svdexport.errors import SvdExportError
from svdexport.models.family import Sampling, Shapes
from svdexport.runtime.manifest import PlanRecord

# The error model of the plan search forecasts from the last two full steps (order 1) or reuses (order 0).
SEARCH_ORDER = {"svd-taylor": 1, "ema-velocity": 1, "ema": 0, "reuse": 0, "svd-fitted": 1}


def forecast_kind(predictor: str) -> str:
    """What a plan record was searched for: "fitted" weights (cache/fitted.py) or the Taylor error model."""
    return "fitted" if predictor in FITTED else "taylor"


def search(stats: PlanStats, budget: int, cache: CacheConfig, weights=None) -> plans.Plan:
    """The DP's plan of `budget` full steps for `cache`'s forecast: on the fitted forecast's errors for a
    fitted predictor, else on the Taylor error model of its order and gamma."""
    if cache.predictor in FITTED:
        found = plans.search_table(fit.errors(stats), budget, weights)
        return plans.Plan(found.full_steps, found.cost, 1, cache.gamma)
    return plans.search(stats, budget, SEARCH_ORDER[cache.predictor], cache.gamma, weights)


def cost(stats: PlanStats, full_steps: list[int], cache: CacheConfig, weights=None) -> float:
    """The DP's objective for a given plan under `cache`'s forecast (see `search`)."""
    if cache.predictor in FITTED:
        return plans.table_cost(fit.errors(stats), full_steps, weights)
    return plans.plan_cost(stats, full_steps, SEARCH_ORDER[cache.predictor], cache.gamma, weights)


@dataclass
class RequestPlan:
    full_steps: list[int]  # indices of the steps that run the full graph
    steps: int
    how: str  # "uniform", "calibrated", or the rule that made it from a calibrated plan
    fitted: dict[int, fit.Weights] | None = None  # a fitted predictor's weights per cached step
    fallback: str | None = None  # why the engine's forecast is not the one this request runs, if it is not

    @property
    def mask(self) -> list[bool]:
        return plans.plan_mask(self.full_steps, self.steps)

    def describe(self) -> str:
        return f"full steps ({self.how}): {' '.join(map(str, self.full_steps))}"


def plan_for(steps: int, cache: CacheConfig, records: list[PlanRecord], stats: PlanStats | None,
             weights) -> RequestPlan:
    """The plan of one request. `weights(steps)` gives the per-step weights of the family's schedule;
    `stats` are the plan statistics of the request's step count where the build made them. A fitted
    predictor gets its weights for the plan, fitted at the statistics' step count."""
    if cache.predictor not in FITTED:
        return _plan_for(steps, cache, records, stats, weights)
    if stats is None:
        raise SvdExportError(f"predictor {cache.predictor} needs the plan statistics of a build; this engine "
                             "keeps none (rebuild it, or run another predictor)")
    if stats.steps == steps:
        plan = _plan_for(steps, cache, records, stats, weights)
        plan.fitted = fit.weights(stats, plan.full_steps, steps)
        return plan
    # The stated rule: weights are fitted at the calibrated step count only. Elsewhere run Taylor order 1 on
    # both parts, on Taylor's own plan (rescaled): the fitted plan's long gaps are the fit's, not Taylor's.
    taylor = dataclasses.replace(cache, predictor="svd-taylor", order=1, gamma=1.0)
    plan = _plan_for(steps, taylor, records, stats, weights)
    plan.fitted = fit.taylor_weights(plan.full_steps, steps, stats.gram.shape[0])
    plan.fallback = (f"{cache.predictor} is fitted for {stats.steps} steps: svd-taylor's plan and weights at {steps} "
                     f"(build with --plan-steps {steps} to fit it there)")
    plan.how += f"; {plan.fallback}"
    return plan


def plan_budget(cache: CacheConfig, steps: int) -> int:
    """Full steps of a calibrated plan of `steps` steps: --full-steps, or as many as the uniform plan of
    warmup and interval has."""
    return min(cache.full_steps or len(plans.uniform_plan(steps, cache.warmup, cache.interval)), steps)


def _plan_for(steps: int, cache: CacheConfig, records: list[PlanRecord], stats: PlanStats | None,
              weights) -> RequestPlan:
    uniform = plans.uniform_plan(steps, cache.warmup, cache.interval)
    if cache.plan == "uniform" or (stats is None and not records):
        return RequestPlan(uniform, steps, "uniform")
    budget = plan_budget(cache, steps)
    for r in records:
        if (r.steps == steps and len(r.full_steps) == budget and r.forecast == forecast_kind(cache.predictor)
                and (r.forecast == "fitted" or (r.gamma == cache.gamma and r.order == SEARCH_ORDER[cache.predictor]))):
            # a plan searched for this very forecast
            return RequestPlan(list(r.full_steps), steps, "calibrated")
    if stats is None:  # only the recorded plan: map it onto this request
        r = records[0]
        return RequestPlan(plans.rescale(r.full_steps, r.steps, steps, budget), steps,
                           f"calibrated for {r.steps} steps, rescaled to {steps}")
    at = stats.steps
    found = search(stats, min(budget, at), cache, weights(at))
    if at == steps:
        return RequestPlan(found.full_steps, steps, "calibrated")
    return RequestPlan(plans.rescale(found.full_steps, at, steps, budget), steps,
                       f"calibrated for {at} steps, rescaled to {steps}")


def schedule_weights(sampling: Sampling, shapes: Shapes, steps: int):
    """|sigma_{i+1} - sigma_i| of the family's schedule: a feature error on step i enters the latents times it."""
    scheduler = sampling.scheduler()
    sampling.set_timesteps(scheduler, steps, shapes)
    return plans.step_weights(scheduler.sigmas.double().cpu().numpy())
