"""Step plans: which steps of a request run the full graph (`StepPlan`, the one plan type of the project), and
the calibrated ones chosen by an exact dynamic programme.

A plan is a sorted list of step indices that run the full graph (step 0 always). On a cached step i whose
last two full steps are k < j, every forecast of the project is linear in the features:

    F^_i = F_j + a M (F_j - F_k),   a = (i - j) / (j - k),   M = gamma I + (1 - gamma) P

with P = V V^T the projection on the principal subspace. gamma = 0 is SVD-Cache (principal coefficients
by Taylor, residual reused), 0 < gamma < 1 forecasts the residual with a damped Taylor step, gamma = 1 is
TaylorSeer on the whole feature; order 0 (a = 0) is plain reuse. So the error ||F^_i - F_i||^2 is a
quadratic form in inner products of s_p = F_p and t_p = P F_p across steps, which
`plan_stats.PlanAccumulator` sums online: O(sites x S^2) numbers, whatever the number of samples. Plans are
static lists; nothing at run time branches on tensor values.

The DP weighs the error of step i by `step_sizes[i]` = |sigma_{i+1} - sigma_i| of the family's schedule (a
feature error enters the latents times the step size), or 1 where none are given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from svdexport.cache.plan_stats import PlanStats
from svdexport.errors import SvdExportError

GAMMA_GRID = tuple(i / 20 for i in range(21))

# A fitted forecast's weights on one cached step (cache/fitted.py): principal (a, b) [2, sites, k or 1] and
# residual (c, d) [2, sites], applied to the last two full steps' values.
ForecastWeights = tuple[np.ndarray, np.ndarray]


@dataclass
class StepPlan:
    """Which of `steps` sampling steps run the full graph: what a request runs, whoever made the plan."""

    full_steps: list[int]  # sorted step indices, step 0 first (a cached step needs something cached)
    steps: int
    source: str = "uniform"  # "uniform", "calibrated", or the rule that made it from a calibrated plan
    forecast_weights: dict[int, ForecastWeights] | None = None  # a fitted predictor's, per cached step
    fallback: str | None = None  # why the engine's forecast is not the one this plan runs, if it is not

    def __post_init__(self):
        self.full_steps = sorted(set(int(i) for i in self.full_steps))
        if not self.full_steps or self.full_steps[0] != 0 or self.full_steps[-1] >= self.steps:
            raise ValueError(f"a plan of {self.steps} steps must start with a full step and stay in range, "
                             f"got {self.full_steps}")

    @classmethod
    def uniform(cls, steps: int, warmup: int, interval: int) -> "StepPlan":
        """The first `warmup` steps, then every `interval`-th step. The phase follows TaylorSeer, whose counts
        the paper reports (50 steps, warmup 3: interval 5 -> 12 full steps, 7 -> 9, 8 -> 8)."""
        if steps < 1:
            raise SvdExportError(f"steps must be >= 1, got {steps}")
        return cls([i for i in range(steps) if i < warmup or (i - warmup + 1) % interval == 0] + [0], steps)

    @property
    def mask(self) -> list[bool]:
        """True where step i runs the full graph."""
        full = set(self.full_steps)
        return [i in full for i in range(self.steps)]

    def describe(self) -> str:
        return f"full steps ({self.source}): {' '.join(map(str, self.full_steps))}"


def step_sizes(sigmas) -> np.ndarray:
    """|sigma_{i+1} - sigma_i| per step: a feature error on step i enters the latents multiplied by it."""
    s = np.asarray(sigmas, dtype=np.float64)
    return np.abs(np.diff(s))


def site_weights(stats: PlanStats) -> np.ndarray:
    """1 / mean feature energy per site, so that sites of different scales count alike."""
    energy = np.einsum("sii->s", stats.gram) / stats.steps
    return 1.0 / np.maximum(energy, 1e-300)


def forecast_errors(stats: PlanStats, order: int = 1, gamma: float = 0.0,
                    sites: np.ndarray | None = None) -> np.ndarray:
    """err[k, j, i]: site-weighted squared error on step i forecast from full steps k < j < i.

    k = S stands for "no earlier full step" (only j is known), where every predictor reuses F_j.
    """
    S = stats.steps
    w = site_weights(stats) if sites is None else np.asarray(sites, dtype=np.float64)
    G, X, H = (np.einsum("s,spq->pq", w, m) for m in (stats.gram, stats.cross, stats.proj))
    K, J, I = np.meshgrid(np.arange(S + 1), np.arange(S), np.arange(S), indexing="ij")
    valid = (J < I) & ((K < J) | (K == S))
    a = np.where((K < J) & valid & (order >= 1), (I - J) / np.maximum(J - K, 1), 0.0)
    K = np.where(K == S, J, K)  # any valid index: its coefficients are zero there
    c = 1.0 - gamma
    # e = sum alpha_p s_p + sum beta_p t_p (see the module docstring).
    s_terms = [(J, 1.0 + a * gamma), (I, -np.ones_like(a)), (K, -a * gamma)]
    t_terms = [(J, a * c), (K, -a * c)]
    err = np.zeros(a.shape)
    for (p, u), (q, v) in itertools.product(s_terms, s_terms):
        err += u * v * G[p, q]
    for (p, u), (q, v) in itertools.product(s_terms, t_terms):
        err += 2 * u * v * X[p, q]
    for (p, u), (q, v) in itertools.product(t_terms, t_terms):
        err += u * v * H[p, q]
    return np.where(valid, np.maximum(err, 0.0), 0.0)


@dataclass
class Searched:
    """The DP's plan: its full steps, its cost, and the forecast it was searched for."""

    full_steps: list[int]  # sorted, starts with 0
    cost: float  # weighted forecast error of the cached steps on the calibration trajectories
    order: int = 1
    gamma: float = 0.0
    costs: dict = field(default_factory=dict)  # gamma -> cost of its best plan, when gamma was calibrated


def _segment_costs(err: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """seg[k, j, n]: cost of the cached steps j+1..n-1 from state (k, j); n = S means to the end.

    err[k, j, i] is zero for i <= j, so a prefix sum over i is the segment's sum.
    """
    seg = np.zeros((err.shape[0], err.shape[1], err.shape[2] + 1))
    seg[:, :, 1:] = np.cumsum(err * sizes[None, None, :], axis=2)
    return seg


def search(stats: PlanStats, budget: int, order: int = 1, gamma: float = 0.0, step_sizes=None,
           sites: np.ndarray | None = None) -> Searched:
    """The plan of exactly `budget` full steps (step 0 included) with the least weighted forecast error."""
    plan = search_table(forecast_errors(stats, order, gamma, sites), budget, step_sizes)
    return Searched(plan.full_steps, plan.cost, order, gamma)


def search_table(err: np.ndarray, budget: int, step_sizes=None) -> Searched:
    """The DP on any error table err[k, j, i] (as `forecast_errors` lays it out), e.g. one measured
    through the output head. Over (previous full k, last full j, full steps used): O(budget x S^3), exact.
    """
    S = err.shape[1]
    if not 1 <= budget <= S:
        raise ValueError(f"budget must be in [1, {S}], got {budget}")
    w = np.ones(S) if step_sizes is None else np.asarray(step_sizes, dtype=np.float64)[:S]
    seg = _segment_costs(err, w)
    js, ns = np.arange(S)[None, :], np.arange(S + 1)
    best = np.full((S + 1, S), np.inf)
    best[S, 0] = 0.0  # step 0 full, nothing before it
    back = []
    for _ in range(budget - 1):
        # new[j, n] = min_k best[k, j] + seg[k, j, n], for n > j
        total = best[:, :, None] + seg  # [k, j, n]
        total = np.where((ns[None, None, :] > js[:, :, None]) & (ns[None, None, :] < S), total, np.inf)
        arg = total.argmin(axis=0)  # [j, n]
        best = np.full((S + 1, S), np.inf)
        best[:S, :] = np.take_along_axis(total, arg[None], axis=0)[0][:, :S]  # new state (k, j) = (j, n)
        back.append(arg)
    final = best + seg[:, :, S]
    k, j = np.unravel_index(np.argmin(final), final.shape)
    cost = float(final[k, j])
    if not np.isfinite(cost):
        raise ValueError(f"no plan of {budget} full steps in {S} steps")
    plan = [int(j)]
    for arg in reversed(back):  # state (k, j) came from (arg[k, j], k)
        k, j = int(arg[k, j]), int(k)
        plan.append(j)
    return Searched(sorted(plan), cost)


def calibrate_gamma(stats: PlanStats, budget: int, order: int = 1, grid=GAMMA_GRID, step_sizes=None,
                    plan: list[int] | None = None, sites: np.ndarray | None = None) -> Searched:
    """The residual damping gamma (and plan, unless `plan` is given) with the least error, over a grid."""
    results = []
    for g in grid:
        if plan is None:
            results.append(search(stats, budget, order, g, step_sizes, sites))
        else:
            results.append(Searched(list(plan), plan_cost(stats, plan, order, g, step_sizes, sites), order, g))
    best = min(results, key=lambda r: r.cost)
    best.costs = {r.gamma: r.cost for r in results}
    return best


def plan_cost(stats: PlanStats, plan: list[int], order: int = 1, gamma: float = 0.0, step_sizes=None,
              sites: np.ndarray | None = None) -> float:
    """The weighted forecast error of a given plan (the DP's objective)."""
    return table_cost(forecast_errors(stats, order, gamma, sites), plan, step_sizes)


def table_cost(err: np.ndarray, plan: list[int], step_sizes=None) -> float:
    """The weighted cost of a plan on an error table (what `search_table` minimises)."""
    S = err.shape[1]
    w = np.ones(S) if step_sizes is None else np.asarray(step_sizes, dtype=np.float64)[:S]
    if 0 not in plan:
        raise ValueError("step 0 must be full: a cached step needs something cached")
    full = set(plan)
    cost, k, j = 0.0, S, None
    for i in range(S):
        if i in full:
            k, j = (S if j is None else j), i
        else:
            cost += w[i] * err[k, j, i]
    return float(cost)


@dataclass
class Refined:
    full_steps: list[int]
    score: float  # the score of `full_steps` (higher is better)
    evaluations: int  # distinct plans scored


def refine(starts: list[list[int]], steps: int, score, shifts=(1, 2, 3), max_evaluations: int = 300,
           tails: bool = False) -> Refined:
    """Closed-loop local search: from the best-scoring plan of `starts` (all of one budget), move one full
    step (never step 0) by +-shift while that raises `score(plan)` (e.g. the mean PSNR of cached sampling
    against full compute on calibration inputs), with `tails` also it and all later full steps together,
    until no single move does or `max_evaluations` plans were scored. The budget stays the same and the
    result is again a static list of step indices."""
    seen: dict[tuple, float] = {}

    def value(plan: list[int]) -> float:
        key = tuple(plan)
        if key not in seen:
            seen[key] = float(score(list(plan)))
        return seen[key]

    if len({len(p) for p in starts}) != 1 or any(0 not in p for p in starts):
        raise ValueError("refine: every start must have the same number of full steps and include step 0")
    best = max((sorted(p) for p in starts), key=value)
    best_score = value(best)
    improved = True
    while improved and len(seen) < max_evaluations:
        improved = False
        for idx in range(1, len(best)):
            # One full step moved by d, or (tails) it and every later one shifted together.
            for d, end in itertools.product([s * sign for s in shifts for sign in (1, -1)],
                                            (idx + 1, len(best)) if tails else (idx + 1,)):
                cand = sorted(best[:idx] + [f + d for f in best[idx:end]] + best[end:])
                if len(set(cand)) < len(best) or cand[0] != 0 or cand[-1] >= steps or tuple(cand) in seen:
                    continue
                if len(seen) >= max_evaluations:
                    break
                if (v := value(cand)) > best_score:
                    best, best_score, improved = cand, v, True
                    break
    return Refined(best, best_score, len(seen))


def rescale(full_steps: list[int], steps_from: int, steps_to: int, budget: int | None = None) -> list[int]:
    """A plan of `steps_from` steps mapped onto `steps_to` (each full step at the same fraction of the
    schedule), topped up with the earliest free steps to `budget` full steps (default: as many as it has):
    the stated rule when a request's step count is not the calibrated one."""
    budget = min(len(full_steps) if budget is None else budget, steps_to)
    out = sorted({min(round(f * steps_to / steps_from), steps_to - 1) for f in full_steps} | {0})
    free = [i for i in range(steps_to) if i not in out]
    while len(out) < budget:
        out = sorted(out + [free.pop(0)])
    return out[:budget] if len(out) > budget else out
