"""The calibrated step plans of a build: the DP's plan of least forecast error per budget, optionally refined
in closed loop on the calibration inputs (`plan.refine`), with the plan statistics they come from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm import tqdm

from svdexport.builder import calibrate as calibrate_mod
from svdexport.builder.calibrate import CALIBRATION_SEED, CalibrationSettings, plan_statistics
from svdexport.cache import plan as plans
from svdexport.cache.plan import StepPlan
from svdexport.cache.plan_stats import PlanStats
from svdexport.cache.svd import Bases
from svdexport.cache import fitted as fit
from svdexport.cache.predictors import FITTED
from svdexport.runtime import manifest as mf
from svdexport.runtime import plans as run_plans
from svdexport.runtime.plans import SEARCH_ORDER, schedule_step_sizes

if TYPE_CHECKING:  # builder imports this module
    from svdexport.builder.build import BuildOptions, Prepared

# Budgets refined besides the build's own b (b + offset, clamped to the steps): the ladder that
# docs/benchmarks.md reports (7, 9, 12 of 50 around FLUX's 9). Other budgets get the DP's plan at run time.
REFINE_OFFSETS = (-2, 0, 3)


def refine_budgets(budget: int, steps: int, given: list[int] | None) -> list[int]:
    """The build's budget and the other budgets to refine: those of 2 to steps - 1 full steps (one full
    step or all of them leave nothing to choose)."""
    chosen = given if given else [budget + d for d in REFINE_OFFSETS]
    return sorted({b for b in chosen if 1 < b < steps} | {budget})


def calibrate_plan(p: Prepared, opts: BuildOptions, bases: Bases,
                   progress: bool) -> tuple[list[PlanStats], list[mf.PlanRecord]]:
    """The plan statistics of the calibration trajectories, at the build's step count and then at each of
    `plan_steps`, and the calibrated plans.

    At the build's step count: the build's budget (`--full-steps`, or as many as the uniform plan of warmup
    and interval has) first, then the other refined budgets. Each starts as the DP's plan of least forecast
    error (with and without the schedule's step sizes, and the uniform plan where one has that budget: the
    best-scoring start) and is refined in closed loop on the calibration inputs (`plan.refine`) unless
    `refine_evaluations` is 0. At each of `plan_steps`: the DP's plan of the build's budget there. A
    uniform-plan build gets the statistics alone (a fitted predictor's weights come from them)."""
    def statistics(steps: int) -> PlanStats:
        settings = CalibrationSettings(opts.calib_samples, steps, opts.cache.tau, opts.cache.k_max)
        return plan_statistics(p.full, p.cached, p.sampling, p.shapes, bases.vectors.to(opts.device),
                               lambda seed: p.inputs(seed, opts), settings, progress=progress)

    sets = [statistics(n) for n in [opts.calib_steps, *opts.plan_steps]]
    c = opts.cache
    if c.plan_kind != "calibrated":
        return sets, []
    records = [r for n, stats in enumerate(sets) for r in _calibrated_plans(p, opts, bases, stats, progress, n == 0)]
    return sets, records


def _calibrated_plans(p: Prepared, opts: BuildOptions, bases: Bases, stats: PlanStats, progress: bool,
                      refine: bool) -> list[mf.PlanRecord]:
    """The plans of `stats`' step count: refined (when `refine` and the build asks) or the DP's."""
    c, steps = opts.cache, stats.steps
    uniform = StepPlan.uniform(steps, c.warmup, c.interval).full_steps
    budget = run_plans.plan_budget(c, steps)
    sizes, order = schedule_step_sizes(p.sampling, p.shapes, steps), SEARCH_ORDER[c.predictor]
    refine = refine and opts.refine_evaluations > 0
    budgets = refine_budgets(budget, steps, opts.refine_budgets) if refine else [budget]
    score = None
    if refine:
        x = calibrate_mod.batch_inputs([p.inputs(CALIBRATION_SEED + i, opts) for i in range(opts.refine_samples)],
                                       p.fam.batched)
        fitted = (lambda plan: fit.forecast_weights(stats, plan, steps)) if c.predictor in FITTED else None
        score = calibrate_mod.closed_loop_score(p.full, p.cached, p.sampling, p.shapes, bases.vectors.to(opts.device),
                                                c, x, steps, fitted)
    records = []
    for b in sorted(budgets, key=lambda b: b != budget):  # the build's budget first
        found = run_plans.search(stats, b, c, sizes)
        full_steps, refined = found.full_steps, None
        if score is not None and 1 < b < steps:
            starts = [found.full_steps, run_plans.search(stats, b, c).full_steps]
            starts += [u for iv in range(1, steps + 1)
                       if len(u := StepPlan.uniform(steps, c.warmup, iv).full_steps) == b][:1]
            with tqdm(desc=f"refining the plan of {b} full steps", unit="plan", disable=not progress) as bar:
                def counted(plan, bar=bar):
                    bar.update()
                    return score(plan)

                refined = plans.refine(starts, steps, counted, max_evaluations=opts.refine_evaluations, tails=True)
            full_steps = refined.full_steps
        cost = run_plans.cost(stats, full_steps, c, sizes)
        uniform_cost = run_plans.cost(stats, uniform, c, sizes) if len(uniform) == b else None
        records.append(mf.PlanRecord(steps, full_steps, cost, uniform_cost, c.gamma, order,
                                     score=None if refined is None else round(refined.score, 3),
                                     refined=refined is not None, forecast=run_plans.forecast_kind(c.predictor)))
    return records
