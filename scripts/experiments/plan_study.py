"""Issue 12 study: calibrated step plans and a damped residual forecast on an engine's eager graphs.

    PYTHONPATH=. python scripts/experiments/plan_study.py --engine /tmp/wt12-eng/digits-eager

Calibrates plans on the calibration seeds (1_000_000 + i, as the build does), then reports PSNR of the
decoded images against full compute on held-out seeds: mean, worst sample, and paired statistics against
today's default (uniform plan, principal Taylor-1 + residual reuse) at the same number of full steps.
Raw results go to out/plan_study.json. A script, not a test: minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import svdexport
from svdexport.bench.metrics import psnr
from svdexport.cache.plan import GAMMA_GRID, StepPlan, forecast_errors, search_table, step_sizes, table_cost
from svdexport.cache.plan_stats import PlanAccumulator
from svdexport.cache.predictors import ResidualForecast
from svdexport.cache.svd import reconstruct
from svdexport.builder.calibrate import CALIBRATION_SEED
from svdexport.runtime.scheduler import StepCache

# Uniform plans of today's rule with 9 and 7 full steps out of 50 (warmup 3).
UNIFORM = {9: (3, 7), 7: (3, 10)}


class PlanStep(StepCache):
    """StepCache with a given plan and the residual forecast by damped Taylor (gamma 0: reuse)."""

    def __init__(self, engine, bases, steps, full_steps, gamma, record=None):
        super().__init__(engine.full, engine.cached, bases, engine.cache, StepPlan(full_steps, steps))
        self.plan = self.mask
        self.residual = ResidualForecast(gamma)
        self.record = record  # list to collect the (true or forecast) feature per step, or None

    def __call__(self, i, inputs):
        self.state.update(inputs)
        if self.plan[i]:
            out, coeffs, residuals = self.full(*[self.state[n] for n in self.full.input_names])
            self.predictor.update(i, coeffs)
            self.residual.update(i, residuals)
            self.state["residuals"] = residuals
            self.last = coeffs, residuals
        else:
            coeffs, residuals = self.predictor.predict(i), self.residual.predict(i)
            self.state["coeffs"], self.state["residuals"] = coeffs, residuals
            out = self.cached(*[self.state[n] for n in self.cached.input_names])
        if self.record is not None:  # (feature, the cached graph's other inputs) per step
            f = reconstruct(coeffs, residuals, self.state["bases"]).clone()
            self.record.append((f, {n: self.state[n] for n in self.cached.input_names
                                    if n not in ("bases", "coeffs", "residuals")}))
        return out


@torch.inference_mode()
def generate(engine, inputs, steps, bases, full_steps, gamma=0.0, record=None, on_step=None):
    sampling, scheduler = engine.sampling, engine.sampling.scheduler()
    step = PlanStep(engine, bases, steps, full_steps, gamma, record)
    timesteps = sampling.set_timesteps(scheduler, steps, engine.shapes)
    latents = inputs["hidden_states"]
    step.state.update(inputs)
    for i, t in enumerate(timesteps):
        out = step(i, {"hidden_states": latents, "timestep": sampling.model_timestep(t, latents)})
        if on_step is not None:
            on_step(i, latents, out)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
    return latents


def sigmas(engine, steps):
    scheduler = engine.sampling.scheduler()
    engine.sampling.set_timesteps(scheduler, steps, engine.shapes)
    return scheduler.sigmas.double().numpy()


def calibrate(engine, steps, samples, bases):
    """Full-compute trajectories of the calibration seeds (all steps full) and their PlanStats. The
    trajectories are kept (small model) only for the brute-force output objective; the accumulator itself
    holds one trajectory at a time."""
    zero = torch.zeros(bases.shape[0], bases.shape[1], 1)
    acc, trajs = PlanAccumulator(steps, bases), []
    for s in range(samples):
        rec = []
        generate(engine, engine.example_inputs(CALIBRATION_SEED + s), steps, zero, list(range(steps)), record=rec)
        for i, (f, _) in enumerate(rec):
            acc.add(i, f)
        trajs.append(rec)
    return acc.stats(), trajs


@torch.inference_mode()
def output_errors(engine, trajs, bases, gamma, order=1):
    """err[k, j, i] like plan.forecast_errors, but measured on the model output: the cached graph (output
    head) applied to the forecast feature against it applied to the true feature. Brute force over all
    (k, j) per step, so only for small models; a check of the feature-space objective."""
    steps = len(trajs[0])
    err = np.zeros((steps + 1, steps, steps))
    v = bases.double().unsqueeze(1)
    cached = engine.cached
    for rec in trajs:
        feats = torch.stack([f.double() for f, _ in rec])  # [S, sites, B, N, D]
        for i in range(1, steps):
            pairs = [(steps, 0)] + [(k, j) for j in range(1, i) for k in range(j)]
            kk = torch.tensor([min(k, j) for k, j in pairs])
            jj = torch.tensor([j for _, j in pairs])
            a = torch.tensor([0.0 if k == steps or order == 0 else (i - j) / (j - k) for k, j in pairs],
                             dtype=torch.float64)
            u = feats[jj] - feats[kk]  # [P, sites, B, N, D]
            mu = gamma * u + (1 - gamma) * (u @ v @ v.transpose(-1, -2))
            fhat = feats[jj] + a.view(-1, 1, 1, 1, 1) * mu
            P, sites, B = fhat.shape[:3]
            x = dict(rec[i][1])

            def head(f):
                m = f.shape[0]
                ins = {n: (t.repeat(m, *[1] * (t.dim() - 1)) if t.dim() else t) for n, t in x.items()}
                ins["bases"] = torch.zeros(sites, f.shape[-1], 1)
                ins["coeffs"] = torch.zeros(sites, m * B, f.shape[-2], 1)
                ins["residuals"] = f.transpose(0, 1).reshape(sites, m * B, *f.shape[-2:]).float()
                return cached(*[ins[n] for n in cached.input_names]).double().reshape(m, -1)

            out_hat, out = head(fhat), head(feats[i].unsqueeze(0))  # the true output once, broadcast
            e = (out_hat - out).pow(2).sum(1).numpy()
            for (k, j), ev in zip(pairs, e):
                err[k, j, i] += ev
    return err


def image(engine, latents):
    return engine.family.unpack(latents, engine.shapes)[0]


def inputs_for(engine, seed):
    labels = [seed % len(engine.labels)] * engine.shapes.batch if engine.labels else None
    return engine.example_inputs(seed, labels)


def paired(xs, base):
    d = [a - b for a, b in zip(xs, base)]
    return {"mean_diff": statistics.mean(d), "std_diff": statistics.stdev(d) if len(d) > 1 else 0.0,
            "wins": sum(x > 0 for x in d), "n": len(d)}


def diagnose(engine, seeds, steps, out_path):
    """Why a sample falls: PSNR per plan variant (which gap hurts), per-step latent drift, and the
    sample's sensitivity to a random 2% latent perturbation at step 9 under full compute afterwards."""
    from svdexport.bench.compare import _classifier

    bases = engine.sampler.bases
    dim = bases.shape[1]
    identity = torch.eye(dim).expand(bases.shape[0], dim, dim).contiguous()
    uni = StepPlan.uniform(steps, 3, 7).full_steps
    variants = {
        "uniform (default)": (uni, bases, 0.0), "uniform, SVD gamma=0.75": (uni, bases, 0.75),
        "uniform, whole feature": (uni, identity, 0.0),
        "uniform + steps 3-8 full (10 more)": (sorted(set(uni) | set(range(3, 9))), bases, 0.0),
        "only steps 3-8 cached": ([0, 1, 2] + list(range(9, steps)), bases, 0.0),
        "only steps 45-49 cached": (list(range(45)), bases, 0.0),
        "uniform with 1 -> 4 (0 2 4 9 16 ... 44)": ([0, 2, 4] + uni[3:], bases, 0.0),
    }
    classifier = _classifier()
    report = {}
    for seed in seeds:
        x = inputs_for(engine, seed)
        drift = {}
        ref_lat = []
        ref = generate(engine, x, steps, bases, list(range(steps)), on_step=lambda i, l, o: ref_lat.append(l.clone()))
        ref_img = image(engine, ref)
        row = {"label": seed % len(engine.labels), "class_ref": _predict(classifier, ref_img)}
        for name, (plan, b, g) in variants.items():
            lat = []
            got = generate(engine, x, steps, b, plan, g, on_step=lambda i, l, o: lat.append(l.clone()))
            img = image(engine, got)
            row[name] = {"psnr": psnr(img, ref_img), "class": _predict(classifier, img)}
            drift[name] = [float((p - q).norm() / q.norm()) for p, q in zip(lat, ref_lat)]
        gen = torch.Generator().manual_seed(0)
        noisy = []
        for _ in range(3):
            def kick(i, lat, out):
                if i == 9:
                    n = torch.randn(lat.shape, generator=gen)
                    lat += 0.02 * lat.norm() / n.norm() * n
            noisy.append(psnr(image(engine, generate(engine, x, steps, bases, list(range(steps)), on_step=kick)),
                              ref_img))
        row["full compute, 2% random latent kick at step 9"] = noisy
        row["latent drift (rel. L2 per step)"] = drift
        report[seed] = row
        print(seed, json.dumps({k: v for k, v in row.items() if not k.startswith("latent")}, default=float))
        print("  drift at steps 9/20/35/49:", {k: [round(v[i], 3) for i in (9, 20, 35, 49)] for k, v in drift.items()})
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(report, indent=1, default=float))


def _predict(classifier, img):
    import torch.nn.functional as F

    x = (F.avg_pool2d(img[:1].clamp(-1, 1).unsqueeze(0), 2) + 1) / 2 * 16
    return int(classifier.predict(x.flatten(1).numpy())[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="/tmp/wt12-eng/digits-eager")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: the engine's)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[9, 7])
    ap.add_argument("--seed-sets", nargs="+", default=["1000:16", "0:16"], help="START:COUNT")
    ap.add_argument("--output-objective", action="store_true",
                    help="also plans from the brute-force output-head error (slow: minutes per gamma)")
    ap.add_argument("--diagnose", type=int, nargs="+", metavar="SEED", help="only diagnose these seeds")
    ap.add_argument("--out", default=None, help="default out/plan_study.json (out/plan_diagnose.json)")
    a = ap.parse_args()
    torch.manual_seed(0)
    engine = svdexport.load(a.engine).eager_reference()
    steps = a.steps
    if a.diagnose:
        return diagnose(engine, a.diagnose, steps, a.out or "out/plan_diagnose.json")
    a.out = a.out or "out/plan_study.json"
    calib = a.calib or engine.manifest["calibration"]["num_inputs"]
    bases = engine.sampler.bases
    sites, dim = bases.shape[:2]
    identity = torch.eye(dim).expand(sites, dim, dim).contiguous()
    t0 = time.time()
    stats, trajs = calibrate(engine, steps, calib, bases)
    w_dt = step_sizes(sigmas(engine, steps))
    print(f"calibration: {calib} trajectories in {time.time() - t0:.1f} s", flush=True)
    # Objectives: the feature-space Gram form (what a build can afford), and optionally the error measured
    # through the output head by brute force (small models only), on a coarser gamma grid.
    objectives = {"feature": lambda g: forecast_errors(stats, 1, g)}
    if a.output_objective:
        objectives["output"] = lambda g: output_errors(engine, trajs, bases, g)
    grid = (0.0, 0.5, 0.75, 1.0)
    tables = {}
    for name, err in objectives.items():
        t0 = time.time()
        tables[name] = {g: err(g) for g in (grid if name == "output" else GAMMA_GRID)}
        print(f"{name} objective tables in {time.time() - t0:.0f} s", flush=True)
    # Methods: (name, budget, full steps, bases, gamma, objective costs of the method under each objective).
    methods, plans = [], {}
    for n in a.budgets:
        uni = StepPlan.uniform(steps, *UNIFORM[n]).full_steps
        assert len(uni) == n, (n, uni)
        entries = [("uniform, SVD reuse (default)", uni, 0.0), ("uniform, whole feature", uni, 1.0)]
        for name, tabs in tables.items():
            gs = list(tabs)
            by_gamma = {g: search_table(t, n, w_dt) for g, t in tabs.items()}
            g_best = min(by_gamma, key=lambda g: by_gamma[g].cost)
            g_uni = min(gs, key=lambda g: table_cost(tabs[g], uni, w_dt))
            flat = search_table(tabs[1.0], n)
            plans[f"{n}/{name}"] = {"reuse": by_gamma[0.0].full_steps, "whole": by_gamma[1.0].full_steps,
                                    "gamma": g_best, "gamma_plan": by_gamma[g_best].full_steps,
                                    "gamma_on_uniform": g_uni, "whole_unweighted": flat.full_steps,
                                    "cost_by_gamma": {g: p.cost for g, p in by_gamma.items()}}
            print(f"[{n} full, {name} objective] {json.dumps(plans[f'{n}/{name}'])}", flush=True)
            entries += [(f"{name} plan, SVD reuse", by_gamma[0.0].full_steps, 0.0),
                        (f"{name} plan, SVD gamma={g_best}", by_gamma[g_best].full_steps, g_best),
                        (f"{name} plan, whole feature", by_gamma[1.0].full_steps, 1.0),
                        (f"{name} plan unweighted, whole feature", flat.full_steps, 1.0)]
            if name == "feature":
                entries.insert(1, (f"uniform, SVD gamma={g_uni}", uni, g_uni))
        for name, plan, g in entries:
            methods.append((f"{n}: {name}", n, plan, identity if g == 1.0 else bases, g))

    results = {"engine": a.engine, "steps": steps, "calibration_samples": calib, "plans": plans,
               "step_weights": w_dt.tolist(), "sets": {}}
    for spec in a.seed_sets:
        start, count = map(int, spec.split(":"))
        seeds = list(range(start, start + count))
        per = {m[0]: [] for m in methods}
        t0 = time.time()
        for seed in seeds:
            x = inputs_for(engine, seed)
            ref = image(engine, generate(engine, x, steps, bases, list(range(steps))))
            done = {}  # identical (plan, bases, gamma) runs once
            for name, n, plan, b, gamma in methods:
                key = (tuple(plan), gamma)
                if key not in done:
                    done[key] = min(psnr(image(engine, generate(engine, x, steps, b, plan, gamma)), ref), 99.0)
                per[name].append(done[key])
        rows = []
        for name, n, plan, b, gamma in methods:
            base = per[f"{n}: uniform, SVD reuse (default)"]
            xs = per[name]
            rows.append({"method": name, "full_steps": n, "plan": plan, "gamma": gamma,
                         "psnr_mean": statistics.mean(xs), "psnr_worst": min(xs),
                         "worst_seed": seeds[int(np.argmin(xs))], "psnr": xs, "vs_default": paired(xs, base)})
        results["sets"][spec] = {"seeds": seeds, "rows": rows}
        print(f"\nseeds {seeds[0]}-{seeds[-1]} ({time.time() - t0:.0f} s)")
        print(f"{'method':52s} {'mean':>6s} {'worst':>6s} {'seed':>5s} {'d vs def':>8s} {'sd':>5s} wins")
        for r in rows:
            p = r["vs_default"]
            print(f"{r['method']:52s} {r['psnr_mean']:6.2f} {r['psnr_worst']:6.2f} {r['worst_seed']:5d} "
                  f"{p['mean_diff']:+8.2f} {p['std_diff']:5.2f} {p['wins']:2d}/{p['n']}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
