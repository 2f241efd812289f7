"""What `svdexport compare` runs at a budget of full steps: every method with that many full steps.

A method is a row label and a run `(inputs, budget) -> Generation`; the same label at every budget, so
the rows of one method form a line on the frontier plots. Where the full steps fall is stated per row:

- "calibrated": a plan of that budget searched on the engine's calibration trajectories (`engine.plan`) for
  a forecast, which the row names (`search_label`): the engine's own (SVD-Cache's plan, which the peers' "same
  plan" rows run), or the method's own (a Taylor step on the whole feature for TaylorSeer rules, reuse for
  DBCache alone: the peers' "Taylor plan" and "reuse plan" rows), so that each method shows on both;
- "uniform": warmup from the engine, then one full step every `interval` steps, with the interval whose
  plan has that many full steps (or the nearest count; the row shows the count it has);
- "own": a library schedule without a plan input (diffusers TaylorSeer), with its warmup and interval
  chosen to reach the budget;
- "threshold": a library that decides per step from the tensors (FirstBlockCache, MagCache, cache-dit's
  dynamic DBCache); its threshold is swept (`sweep_threshold`) on a couple of samples that are not measured,
  so its full steps reach the budget on average and vary per sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from svdexport.bench import peers as peer_lib
from svdexport.bench.sweep import SWEEP_SEEDS, sweep_threshold
from svdexport.cache import plan as plans
from svdexport.cache.plan import StepPlan
from svdexport.cache.predictors import FITTED
from svdexport.runtime.plans import SEARCH_ORDER
from svdexport.runtime.scheduler import CachedSampler, Generation

# Eager predictor variants compared: (label, overrides of the engine's cache settings).
PREDICTOR_VARIANTS = [
    ("svd-fitted", {"predictor": "svd-fitted"}),
    ("svd-taylor o1", {"predictor": "svd-taylor", "order": 1}),
    ("svd-taylor o2", {"predictor": "svd-taylor", "order": 2}),
    ("ema-velocity b0.5", {"predictor": "ema-velocity", "beta": 0.5}),
    ("ema-velocity b0.9", {"predictor": "ema-velocity", "beta": 0.9}),
    ("ema b0.5", {"predictor": "ema", "beta": 0.5}),
    ("ema b0.9 (paper)", {"predictor": "ema", "beta": 0.9}),
    ("reuse (FORA)", {"predictor": "reuse"}),
]
GAMMA_FALLBACK = 0.5  # residual forecast factor when the engine keeps no plan statistics
# The plan search's forecast for TaylorSeer rules on the whole feature: a Taylor step on the principal part
# and the residual alike (gamma 1). The search's error model forecasts from the last two full steps (order 1),
# so order-2 rules get the order-1 plan.
TAYLOR_SEARCH = {"predictor": "svd-taylor", "order": 1, "gamma": 1.0}
REUSE_SEARCH = {"predictor": "reuse"}  # DBCache without a calibrator reuses the cached residual
# Threshold peers: (row label, peer, fixed options, the library's default threshold, where the sweep starts).
THRESHOLD_PEERS = [
    ("diffusers-fbcache (swept threshold)", "diffusers-fbcache", {}, 0.05),
    ("diffusers-magcache (swept threshold)", "diffusers-magcache", {}, 0.06),
    ("cachedit-dbcache (swept threshold)", "cachedit-dbcache", {"schedule": "dynamic"}, 0.08),
]


@dataclass
class Method:
    name: str  # row label
    backend: str  # what runs it
    plan_kind: str  # how its full steps are placed: calibrated, uniform, own, threshold (see the module docstring)
    run: Callable[[dict, int], Generation]  # (inputs, budget) -> generation
    uncached: bool = False  # the reference: every step full, run once whatever the budgets
    steps_of: Callable[[int], list[int] | None] = lambda b: None  # its static plan at a budget
    settings: Callable[[int], dict] = lambda b: {}  # what the row reports of its configuration at a budget
    peer: str | None = None  # the peer library it runs, if any
    search: Callable[[int], str | None] = lambda b: None  # a calibrated plan: the forecast it was searched for
    base: str = ""  # the method apart from its plan: rows of one base are one method on several plans

    def __post_init__(self) -> None:
        self.base = self.base or self.name


def search_label(cache) -> str:
    """The forecast a calibrated plan was searched for (runtime/plans.py's search): the fitted weights, a
    Taylor step of the search's order 1 with the residual damped by gamma (1: the whole feature), or reuse."""
    if cache.predictor in FITTED:
        return "svd-fitted"
    return "reuse" if SEARCH_ORDER[cache.predictor] == 0 else f"taylor gamma {cache.gamma:g}"


def uniform_interval(steps: int, warmup: int, budget: int) -> int:
    """The interval whose uniform plan (with `warmup`) has `budget` full steps, or the nearest count
    (ties: the shorter interval)."""
    return min(range(1, steps + 1),
               key=lambda iv: (abs(len(StepPlan.uniform(steps, warmup, iv).full_steps) - budget), iv))


@dataclass
class Setup:
    """The engine, its eager twin and the step count, with the plans of each budget (computed once)."""

    engine: object
    eager: object
    steps: int
    _plans: dict = field(default_factory=dict)

    @property
    def warmup(self) -> int:
        return self.engine.cache.warmup

    def overrides(self, budget: int) -> dict:
        """The engine's own kind of plan at `budget` full steps, as run-time overrides."""
        if self.engine.cache.plan_kind == "uniform":
            return {"interval": uniform_interval(self.steps, self.warmup, budget)}
        return {"full_steps": budget}

    def plan(self, budget: int, **overrides) -> list[int]:
        """The full steps the engine runs at `budget` with these overrides of its forecast."""
        key = (budget, tuple(sorted(overrides.items())))
        if key not in self._plans:
            cache = self.engine.cache_config(**self.overrides(budget), **overrides)
            self._plans[key] = self.engine.plan(self.steps, cache).full_steps
        return self._plans[key]

    def searched_for(self, budget: int, **overrides) -> str | None:
        """What the plan of `plan(budget, **overrides)` was searched for (None: a uniform plan). Without plan
        statistics every request gets the engine's recorded plan, searched for the engine's forecast."""
        cache = self.engine.cache_config(**self.overrides(budget), **overrides)
        if cache.plan_kind == "uniform":
            return None
        return search_label(cache if self.engine.stats_for(self.steps) is not None else self.engine.cache)

    def uniform(self, budget: int) -> list[int]:
        return StepPlan.uniform(self.steps, self.warmup, uniform_interval(self.steps, self.warmup, budget)).full_steps

    def gamma(self, budget: int) -> float:
        """Residual forecast factor: the one of least forecast error on the calibration trajectories at this
        budget (gamma > 0 only: 0 is the default row), or GAMMA_FALLBACK without plan statistics."""
        stats, cache = self.engine.stats_for(self.steps), self.engine.cache
        if stats is None:
            return GAMMA_FALLBACK
        best = plans.calibrate_gamma(stats, min(budget, stats.steps), SEARCH_ORDER[cache.predictor],
                                     grid=plans.GAMMA_GRID[1:], step_sizes=self.engine.step_sizes(stats.steps))
        return best.gamma


def predictor_label(cache) -> str:
    return {"svd-taylor": f"svd-taylor o{cache.order}", "svd-fitted": "svd-fitted"}.get(
        cache.predictor, f"{cache.predictor} b{cache.beta}")


def project_methods(s: Setup) -> list[Method]:
    """Eager full compute, the engine with its plan, the uniform plan and a residual forecast, the project's
    predictors (eager) and TaylorSeer on the whole feature with the calibrated and the uniform plan."""
    engine, eager, steps = s.engine, s.eager, s.steps
    label, kind, backend = predictor_label(eager.cache), engine.cache.plan_kind, engine.manifest.backend
    ms = [Method("eager full compute", "eager", "every step", lambda x, b: eager.generate(x, steps=steps, interval=1),
                 uncached=True, steps_of=lambda b: list(range(steps)))]
    own = f"SVD-Cache {label} (engine)"
    ms.append(Method(own, backend, kind,
                     lambda x, b: engine.generate(x, steps=steps, **s.overrides(b)), steps_of=s.plan,
                     settings=lambda b: {"weights": "least squares on the calibration trajectories"}
                     if engine.cache.predictor in FITTED else {"gamma": engine.cache.gamma}, search=s.searched_for))
    if kind != "uniform":
        ms.append(Method(f"SVD-Cache {label} uniform plan (engine)", backend, "uniform",
                         lambda x, b: engine.generate(x, steps=steps, plan_kind="uniform", warmup=s.warmup,
                                                      interval=uniform_interval(steps, s.warmup, b)),
                         steps_of=s.uniform, settings=lambda b: {
                             "warmup": s.warmup, "interval": uniform_interval(steps, s.warmup, b)}, base=own))
    gammas: dict[int, float] = {}

    def gamma(b: int) -> float:
        if b not in gammas:
            gammas[b] = s.gamma(b)
        return gammas[b]

    if engine.cache.predictor not in FITTED:  # a fitted predictor forecasts the residual by its own weights
        ms.append(Method(f"SVD-Cache {label} + residual forecast (engine)", backend, kind,
                         lambda x, b: engine.generate(x, steps=steps, gamma=gamma(b), **s.overrides(b)),
                         steps_of=lambda b: s.plan(b, gamma=gamma(b)),
                         search=lambda b: s.searched_for(b, gamma=gamma(b)),
                         settings=lambda b: {"gamma": gamma(b), "gamma_chosen_by": "least forecast error on the "
                                             "calibration trajectories" if engine.plan_stats else "fixed"}))
    for name, over in PREDICTOR_VARIANTS:
        if over["predictor"] in FITTED and eager.plan_stats is None:
            continue  # no statistics to fit on
        ms.append(Method(f"SVD-Cache {name}", "eager", kind,
                         lambda x, b, over=over: eager.generate(x, steps=steps, **s.overrides(b), **over),
                         steps_of=lambda b, over=over: s.plan(b, **over),
                         search=lambda b, over=over: s.searched_for(b, **over)))
    # TaylorSeer on the whole feature: identity bases make C = F and R = 0, so the same forecast runs on the
    # full feature instead of its principal part. On the engine's plan, on the plan searched for a Taylor step
    # on the whole feature (its own) and on the uniform one, so that the plan's gain and the method's show apart.
    sites, dim = eager.bases.vectors.shape[:2]
    identity = torch.eye(dim).expand(sites, dim, dim).contiguous().to(eager.device)
    whole = CachedSampler(eager.full, eager.cached, identity, eager.cache, eager.sampling, eager.shapes)
    taylor_plan = lambda b: s.plan(b, **TAYLOR_SEARCH)  # noqa: E731
    for order in (1, 2):
        cache = dataclasses.replace(eager.cache, predictor="svd-taylor", order=order, gamma=0.0)
        variants = [(f"{kind} plan", kind, s.plan, s.searched_for)]
        if kind != "uniform":
            variants += [("Taylor plan", kind, taylor_plan, lambda b: s.searched_for(b, **TAYLOR_SEARCH)),
                         ("uniform plan", "uniform", s.uniform, lambda b: None)]
        for plan_name, plan_kind, steps_of, search in variants:
            ms.append(Method(f"TaylorSeer whole feature o{order} ({plan_name})", "eager", plan_kind,
                             lambda x, b, c=cache, f=steps_of: whole.generate(
                                 x, steps, cache=c, plan=StepPlan(f(b), steps)), steps_of=steps_of,
                             search=search, base=f"TaylorSeer whole feature o{order}"))
    return ms


def peer_methods(s: Setup, names: list[str]) -> list[Method]:
    """The peer libraries in `names` at matched full steps, each configured as its authors intend where
    the budget allows (the settings of every row say what was set)."""
    eager, steps, warmup = s.eager, s.steps, s.warmup
    model = eager.full.transformer
    loop = peer_lib.PeerLoop(eager.family, eager.sampling, eager.shapes, steps)

    def run(name: str, x: dict, w: int, iv: int, **options) -> Generation:
        r = peer_lib.run_peer(name, model, loop, x, w, iv, **options)
        return Generation(r.latents, r.full_steps, steps - r.full_steps, r.seconds)

    ms = []
    if "diffusers-taylorseer" in names:
        for lite in [v for v in (False, True) if peer_lib.available("diffusers-taylorseer", eager.family, v) is None]:
            mode = ("lite: blocks skipped, proj_out forecast" if lite
                    else "attention outputs forecast, the rest of every block runs every step (library default)")
            ms.append(Method(f"diffusers-taylorseer{' lite' if lite else ''} o1 (own plan)", "eager", "own",
                             lambda x, b, lite=lite: run("diffusers-taylorseer", x,
                                                         *peer_lib.taylorseer_schedule(steps, b, warmup), lite=lite),
                             steps_of=lambda b: peer_lib.taylorseer_plan(steps, *peer_lib.taylorseer_schedule(
                                 steps, b, warmup)),
                             settings=lambda b, mode=mode: dict(zip(("disable_cache_before_step", "cache_interval"),
                                                                    peer_lib.taylorseer_schedule(steps, b, warmup)),
                                                                max_order=1, mode=mode),
                             peer="diffusers-taylorseer"))
    # cache-dit takes any plan as its mask: SVD-Cache's ("same plan"), and, for a calibrated engine, the plan the
    # same search finds for its own forecast (a Taylor step, or reuse without the calibrator).
    for peer, orders, own in (("cachedit-dbcache", (None,), ("reuse plan", REUSE_SEARCH)),
                              ("cachedit-dbcache-taylorseer", (1, 2), ("Taylor plan", TAYLOR_SEARCH))):
        if peer not in names:
            continue
        for order in orders:
            for plan_name, search in [("same plan", {})] + ([own] if s.engine.cache.plan_kind != "uniform" else []):
                ms.append(_cachedit_method(s, run, peer, order, plan_name, search))
    for label, peer, fixed, start in THRESHOLD_PEERS:
        if peer in names:
            ms.append(threshold_method(s, label, peer, fixed, start, run))
    return ms


def _cachedit_method(s: Setup, run, peer: str, order: int | None, plan_name: str, search: dict) -> Method:
    """cache-dit's DBCache (with its TaylorSeer calibrator at `order`) on the plan searched for `search`'s
    forecast ({}: the engine's own, SVD-Cache's plan) as its static steps_computation_mask."""
    steps, warmup = s.steps, s.warmup
    extra = {} if order is None else {"order": order}
    base = f"{peer}{'' if order is None else f' o{order}'}"

    def settings(b: int) -> dict:
        mask = f"the plan searched for {s.searched_for(b, **search)}" if search else "the SVD-Cache engine's plan"
        return {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "steps_computation_policy": "static",
                "steps_computation_mask": mask, **({} if order is None else {"taylorseer_order": order})}

    return Method(f"{base} ({plan_name})", "eager", s.engine.cache.plan_kind,
                  lambda x, b: run(peer, x, warmup, uniform_interval(steps, warmup, b), schedule="plan",
                                   plan=StepPlan(s.plan(b, **search), steps).mask, **extra),
                  steps_of=lambda b: s.plan(b, **search), settings=settings, peer=peer,
                  search=lambda b: s.searched_for(b, **search), base=base)


def threshold_method(s: Setup, label: str, peer: str, fixed: dict, start: float, run) -> Method:
    """A threshold peer whose threshold per budget is found by `sweep_threshold` on SWEEP_SEEDS (lazily, the
    first time a budget is asked for; compare asks before its measured loop)."""
    steps, warmup = s.steps, s.warmup
    sweep_inputs: list[dict] = []
    # (threshold, interval cap) -> mean full steps on the sweep inputs, shared across budgets. The cap
    # (MagCache's max_skip_steps, DBCache's max_continuous_cached_steps) follows the budget; FBCache has none.
    seen: dict[tuple[float, int], float] = {}
    found: dict[int, tuple[float, float]] = {}

    def cap(b: int) -> int:
        return 0 if peer == "diffusers-fbcache" else uniform_interval(steps, warmup, b)

    def full_steps(t: float, b: int) -> float:
        key = (t, cap(b))
        if key not in seen:
            if not sweep_inputs:
                sweep_inputs.extend(s.engine.example_inputs(seed, _labels(s.engine, seed)) for seed in SWEEP_SEEDS)
            iv = uniform_interval(steps, warmup, b)
            seen[key] = sum(run(peer, x, warmup, iv, threshold=t, **fixed).full_steps for x in sweep_inputs) / len(
                sweep_inputs)
        return seen[key]

    def threshold(b: int) -> float:
        if b not in found:
            t = sweep_threshold(lambda t: full_steps(t, b), b, start)
            found[b] = (t, full_steps(t, b))
        return found[b][0]

    def settings(b: int) -> dict:
        t = threshold(b)
        iv = uniform_interval(steps, warmup, b)
        out = {"threshold": float(f"{t:.4g}"), "sweep_full_steps": found[b][1], "sweep_seeds": list(SWEEP_SEEDS)}
        if peer == "diffusers-magcache":
            out.update(max_skip_steps=iv - 1, retention_ratio=warmup / steps, mag_ratios="its calibrate=True run")
        if peer == "cachedit-dbcache":
            out.update(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup,
                       max_continuous_cached_steps=iv - 1)
        return out

    return Method(label, "eager", "threshold",
                  lambda x, b: run(peer, x, warmup, uniform_interval(steps, warmup, b), threshold=threshold(b),
                                   **fixed), settings=settings, peer=peer)


def _labels(engine, seed: int) -> list[int] | None:
    """The class of sample `seed` for a class-conditioned engine (seed mod the number of classes)."""
    return [seed % len(engine.labels)] * engine.shapes.batch if engine.labels else None
