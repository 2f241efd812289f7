"""Issue 12, svd-fitted: does the closed-loop refinement or an unweighted DP help the fitted forecast at 7 and
9 of 50? Plans are chosen on calibration seeds (1_000_000 + i) only and scored on seeds 16-79.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/experiments/fitted_refine.py ENGINE BUDGETS NCAL EVALUATIONS

Results (2026-11-27, the default aoti digits build's eager twin, 32 calibration inputs, 150 evaluations;
seeds 16-79, mean / worst dB, samples under 35 dB):
  7: dp 42.58 / 33.26 (1)   dp-flat 42.54 / 34.47 (1)   refined 0 2 11 21 29 39 47: 45.14 / 24.88 (2)
  9: dp 49.83 / 35.86 (0)   dp-flat 47.33 / 37.88 (0)   refined 0 2 10 19 23 32 39 46 49: 51.18 / 26.86 (1)
As with Taylor, the closed-loop refinement buys mean with a lost sample; the default stays the DP's plan.
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, "scripts/experiments")
import svdexport
from objective_study import batch_inputs, psnrs
from svdexport.builder.calibrate import CALIBRATION_SEED
from svdexport.cache import fitted as fit
from svdexport.cache import plan as plans
from svdexport.cache.plan import StepPlan
from svdexport.runtime.plans import schedule_step_sizes
from svdexport.runtime.scheduler import CachedSampler


def main():
    path, budgets, ncal, evals = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
    e = svdexport.load(path).eager_reference()
    st, steps = e.plan_stats, 50
    w = schedule_step_sizes(e.sampling, e.shapes, steps)
    loop = CachedSampler(e.full, e.cached, e.sampler.bases, e.cache, e.sampling, e.shapes)

    def run(x, plan):
        return loop.generate(x, steps, plan=StepPlan(plan, steps, forecast_weights=fit.forecast_weights(st, plan, steps))).latents

    cal = batch_inputs(e, [CALIBRATION_SEED + i for i in range(ncal)])
    ev = batch_inputs(e, list(range(16, 80)), labels=lambda s: s % len(e.labels))
    ref_cal = loop.generate(cal, steps, plan=StepPlan(list(range(steps)), steps)).latents
    ref_ev = loop.generate(ev, steps, plan=StepPlan(list(range(steps)), steps)).latents
    err = fit.errors(st)
    for b in budgets:
        cands = {"dp": plans.search_table(err, b, w).full_steps, "dp-flat": plans.search_table(err, b).full_steps}
        t0 = time.time()
        r = plans.refine(list(cands.values()), steps, lambda p: statistics.mean(psnrs(e, run(cal, p), ref_cal)),
                         max_evaluations=evals, tails=True)
        cands["refined"] = r.full_steps
        for name, p in cands.items():
            db = psnrs(e, run(ev, p), ref_ev)
            print(f"[{b}] {name:8s} {statistics.mean(db):.2f} / {min(db):.2f} <35 {sum(x < 35 for x in db)}  {p}"
                  f"  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
