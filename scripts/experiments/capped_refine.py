"""Issue 12: can the closed-loop refinement keep its mean without losing a sample? Refines the DP's plan
(as plan.refine does in the build, with tail shifts, at most 200 plans) under three objectives and scores
the DP's and the refined plan on seeds 16-79 (chosen on nothing), whole-feature Taylor o1 (gamma 1), eager.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/experiments/capped_refine.py CAP OBJECTIVE NCAL BUDGETS
    CAP: dpgap (no gap longer than the DP plan's longest) | none | an int;  OBJECTIVE: mean | pooled | cappedX
    (mean of min(PSNR, X)); NCAL calibration seeds (1_000_000 + i); BUDGETS e.g. 9,7. An eager digits
    engine at /tmp/wt12n/digits-eager (svdexport build --backend eager).

Results (2026-11-27, mean / worst dB on the 64 seeds, samples under 35 dB):
  DP plans:               9: 0 2 4 9 18 26 34 42 47   45.03 / 37.31, 0      7: 0 4 7 15 24 35 44   38.47 / 28.88, 6
  dpgap mean 32:          9: 0 2 3 11 20 29 35 43 48  46.18 / 26.82, 1      (the long early gap 3->11 alone loses seed 71)
  none capped40 64:       9: the DP plan (no move raises the capped mean)  7: 0 1 4 11 26 35 45   40.93 / 24.94, 3
  (earlier, mean 32, tails: 9: 0 2 3 11 22 30 38 44 48  46.98 / 24.16, 1;  7: 0 2 7 21 31 40 47  43.28 / 23.95, 4)
Where the refined 9-plan loses seeds 71 and 1001 (both class 1): moving one full step at a time, only
shortening the 11->22 gap (to 11->18) lifts seed 71 (24.2 -> 35.0 dB); the early 3->11 gap costs it too.
So the mean and the worst sample trade against each other: an objective that cannot give up a sample
(capped at 40 dB) keeps the DP plan at 9 and reaches only 40.9 dB at 7 (the target is 42.35).
Forecasts tried on the same plans and seeds, all worse than Taylor o1 on every plan: Taylor o1 in sigma
instead of step units (-2.6 to -3.2 dB), cache-dit's order-2 term damped by 0.25 / 0.5 / 1 (-0.5 to -17 dB).
DP step weights from the measured output sensitivity (final-latent change per unit feature perturbation at
step i along the feature's motion, 16 calibration seeds; it grows about 40x from step 0 to 48) instead of
|d sigma|: worse at every budget (7: 39.00 / 24.71, 9: 43.33 / 30.07, 12: 46.77 / 35.78 against 38.47 /
28.88, 45.03 / 37.31, 49.98 / 40.97): the DP's additive one-step error is what limits it, not its weights.
"""
import sys, statistics, math, time, json, torch
sys.path.insert(0, 'scripts/experiments')
import svdexport
from objective_study import batch_inputs, generate, psnrs
from svdexport.builder.calibrate import CALIBRATION_SEED
from svdexport.cache import plan as plans
from svdexport.runtime.plans import schedule_step_sizes
cap_mode = sys.argv[1]  # 'dpgap' | 'none' | int
objective = sys.argv[2]  # mean | capped45 | pooled
ncal = int(sys.argv[3]); budgets = [int(b) for b in sys.argv[4].split(',')]
engine = svdexport.load('/tmp/wt12n/digits-eager').eager_reference()
steps, stats = 50, engine.plan_stats
w = schedule_step_sizes(engine.sampling, engine.shapes, steps)
cal = batch_inputs(engine, [CALIBRATION_SEED + i for i in range(ncal)])
ref_cal = generate(engine, cal, steps, range(steps), 't1')
seeds = list(range(16, 80))
ev = batch_inputs(engine, seeds, labels=lambda s: s % len(engine.labels))
ref_ev = generate(engine, ev, steps, range(steps), 't1')
def gaps(p): return max(b - a for a, b in zip(p, p[1:] + [steps]))
for b in budgets:
    dp = plans.search(stats, b, 1, 1.0, w).full_steps
    starts = [dp, plans.search(stats, b, 1, 1.0).full_steps]
    cap = gaps(dp) if cap_mode == 'dpgap' else (99 if cap_mode == 'none' else int(cap_mode))
    def score(p):
        if gaps(p) > cap: return -1e9
        db = psnrs(engine, generate(engine, cal, steps, p, 't1'), ref_cal)
        if objective == 'pooled': return -10 * math.log10(statistics.mean(10 ** (-x / 10) for x in db))
        if objective.startswith('capped'): return statistics.mean(min(x, float(objective[6:])) for x in db)
        return statistics.mean(db)
    t0 = time.time()
    r = plans.refine([s for s in starts if gaps(s) <= cap], steps, score, max_evaluations=200, tails=True)
    for name, p in (('dp', dp), ('refined', r.full_steps)):
        db = psnrs(engine, generate(engine, ev, steps, p, 't1'), ref_ev)
        print(f"[{b}] cap {cap} {objective} n{ncal} {name:8s} mean {statistics.mean(db):.2f} worst {min(db):.2f} "
              f"<35: {sum(x<35 for x in db)}  p10 {sorted(db)[6]:.2f}  {p}  ({time.time()-t0:.0f}s, {r.evaluations} ev)", flush=True)
