"""Which steps of a request run the full graph: the engine's calibrated plan, or the uniform one.

The calibrated plan of the build's step count and budget is stored in the manifest. Another budget at that
step count is searched at run time from the plan statistics in the engine folder (milliseconds). Another
step count gets the stated rule: the calibrated plan of that budget, rescaled to the request's steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from svdexport.cache import plan as plans
from svdexport.cache.config import CacheConfig
from svdexport.models.family import Sampling, Shapes
from svdexport.runtime.manifest import PlanRecord

# The error model of the plan search forecasts from the last two full steps (order 1) or reuses (order 0).
SEARCH_ORDER = {"svd-taylor": 1, "ema-velocity": 1, "ema": 0, "reuse": 0}


@dataclass
class RequestPlan:
    full_steps: list[int]  # indices of the steps that run the full graph
    steps: int
    how: str  # "uniform", "calibrated", or the rule that made it from a calibrated plan

    @property
    def mask(self) -> list[bool]:
        return plans.plan_mask(self.full_steps, self.steps)

    def describe(self) -> str:
        return f"full steps ({self.how}): {' '.join(map(str, self.full_steps))}"


def plan_for(steps: int, cache: CacheConfig, records: list[PlanRecord], stats: plans.PlanStats | None,
             weights) -> RequestPlan:
    """The plan of one request. `weights(steps)` gives the per-step weights of the family's schedule."""
    uniform = plans.uniform_plan(steps, cache.warmup, cache.interval)
    if cache.plan == "uniform" or (stats is None and not records):
        return RequestPlan(uniform, steps, "uniform")
    budget = min(cache.full_steps or len(uniform), steps)
    for r in records:
        if (r.steps == steps and len(r.full_steps) == budget and r.gamma == cache.gamma
                and r.order == SEARCH_ORDER[cache.predictor]):  # a plan searched for this very forecast
            return RequestPlan(list(r.full_steps), steps, "calibrated")
    if stats is None:  # only the recorded plan: map it onto this request
        r = records[0]
        return RequestPlan(plans.rescale(r.full_steps, r.steps, steps, budget), steps,
                           f"calibrated for {r.steps} steps, rescaled to {steps}")
    at = stats.steps
    found = plans.search(stats, min(budget, at), SEARCH_ORDER[cache.predictor], cache.gamma, weights(at))
    if at == steps:
        return RequestPlan(found.full_steps, steps, "calibrated")
    return RequestPlan(plans.rescale(found.full_steps, at, steps, budget), steps,
                       f"calibrated for {at} steps, rescaled to {steps}")


def schedule_weights(sampling: Sampling, shapes: Shapes, steps: int):
    """|sigma_{i+1} - sigma_i| of the family's schedule: a feature error on step i enters the latents times it."""
    scheduler = sampling.scheduler()
    sampling.set_timesteps(scheduler, steps, shapes)
    return plans.step_weights(scheduler.sigmas.double().cpu().numpy())
