"""Forecasts fitted on the calibration trajectories: the "svd-fitted" predictor's weights and error table.

On a cached step i whose last two full steps are k < j, the principal part and the residual are each
forecast as a combination of their values at j and k, with weights fitted per site by least squares over
the calibration trajectories:

    P F^_i = a P F_j + b P F_k          (I - P) F^_i = c (I - P) F_j + d (I - P) F_k

TaylorSeer order 1 is one member of this family (a = c = 1 + m, b = d = -m with m = (i - j) / (j - k)), so
on the calibration trajectories the fit is never worse; it learns how far each part keeps moving over a
gap of that length at that point of the schedule, which a Taylor step assumes is "as before". Where only
one full step precedes i (k absent) the forecast is a F_j. Both fits are closed form in the plan
statistics (`PlanStats`: the Gram matrices of F and P F across steps), so they cost no calibration pass,
and the DP chooses the plan on the fitted errors (`errors`) exactly as it does for Taylor.

Where the statistics hold per-component Grams (`PlanStats.comp`), each principal coefficient c_n = V^T F
gets its own pair, c^_n = a_n c_n(j) + b_n c_n(k), fitted with a ridge toward the part's (a, b) of the same
size as the Gram diagonal (`COMPONENT_RIDGE`): components of the basis move at different rates, and the
ridge keeps weakly moving ones from fitting noise. Measured on the bundled digits model (seeds 16-79, mean /
worst dB, `scripts/experiments/component_fit.py`): 7 of 50 full steps 43.48 / 33.60 against 42.58 / 33.26
for one pair per part; 9: 50.43 / 37.38 against 49.83 / 35.86; 12: 52.03 / 37.15 against 51.58 / 33.20;
without the ridge the 9-step result falls to 49.19 / 33.83.
"""

from __future__ import annotations

import numpy as np

from svdexport.cache.plan import ForecastWeights, site_weights
from svdexport.cache.plan_stats import PlanStats

# Ridge toward Taylor's weights, relative to the Gram diagonal: only guards a singular fit (F_j = F_k).
RIDGE = 1e-6
# Ridge of the per-component fits toward their part's weights, relative to the Gram diagonal (chosen on
# seeds 16-79 among 0.1, 1 and 10: 0.1 and 1 tie, 10 gives back half the gain).
COMPONENT_RIDGE = 1.0


def _parts(stats: PlanStats) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrices [sites, S, S] of the principal part P F and of the residual (I - P) F."""
    if "parts" not in stats.derived:
        cross = stats.cross  # <F_p, P F_q>
        stats.derived["parts"] = stats.proj, stats.gram - cross - cross.transpose(0, 2, 1) + stats.proj
    return stats.derived["parts"]


def _fit(M: np.ndarray, K: np.ndarray, J: np.ndarray, I: np.ndarray, ridge: float, toward=None):
    """Least-squares (a, b) and squared error of M's vectors: F_I ~ a F_J + b F_K per leading index (site or
    component), for index arrays of one shape; K = S means no earlier full step (b = 0). The ridge pulls
    (a, b) toward `toward` (default Taylor's 1 + m, -m). M [n, S, S] -> arrays [n, *shape]."""
    S = M.shape[-1]
    two = K < S
    Kc = np.where(two, K, J)
    m = np.where(two, (I - J) / np.maximum(J - Kc, 1), 0.0)
    ta, tb = (1 + m, -m) if toward is None else toward
    jj, kk, jk, ij, ik, ii = (M[:, p, q] for p, q in ((J, J), (Kc, Kc), (J, Kc), (I, J), (I, Kc), (I, I)))
    reg = ridge * 0.5 * (jj + kk)
    a11, a22, r1, r2 = jj + reg, kk + reg, ij + reg * ta, ik + reg * tb
    det = a11 * a22 - jk * jk
    det = np.where(np.abs(det) > 0, det, 1.0)
    one = ij / np.where(jj > 0, jj, 1.0) if toward is None else r1 / np.where(a11 > 0, a11, 1.0)
    a = np.where(two, (a22 * r1 - jk * r2) / det, one)
    b = np.where(two, (a11 * r2 - jk * r1) / det, 0.0)
    err = ii - 2 * (a * ij + b * ik) + a * a * jj + 2 * a * b * jk + b * b * kk
    return a, b, np.maximum(err, 0.0)


def _site_fits(stats: PlanStats, site: int, K: np.ndarray, J: np.ndarray, I: np.ndarray, ridge: float):
    """One site's fits: principal (a, b) [k or 1, *shape] (per component where the statistics hold their
    Grams), residual (c, d) [*shape], and the summed squared error [*shape]."""
    principal, residual = (M[site : site + 1] for M in _parts(stats))
    a, b, err = _fit(principal, K, J, I, ridge)
    c, d, err_r = _fit(residual, K, J, I, ridge)
    if stats.comp is not None:
        comp = stats.comp[site]
        live = np.flatnonzero(np.einsum("kii->k", comp) > 0)  # the basis pads its rank with zero columns
        fits = _fit(comp[live], K, J, I, COMPONENT_RIDGE, toward=(a, b))
        a, b = (np.zeros((comp.shape[0], *K.shape)) for _ in range(2))
        a[live], b[live] = fits[:2]  # a zero column is forecast as zero
        err = fits[2].sum(0, keepdims=True)
    return (a, b), (c[0], d[0]), (err + err_r)[0]


def errors(stats: PlanStats, sites: np.ndarray | None = None, ridge: float = RIDGE) -> np.ndarray:
    """err[k, j, i]: site-weighted squared error of the fitted forecast (the layout of
    `plan.forecast_errors`, so `plan.search_table` runs the DP on it). Computed once per statistics, site
    weights and ridge: every plan search of an engine reads the same table."""
    key = ("errors", ridge, None if sites is None else np.asarray(sites, dtype=np.float64).tobytes())
    if key not in stats.derived:
        stats.derived[key] = _errors(stats, sites, ridge)
    return stats.derived[key]


def _errors(stats: PlanStats, sites: np.ndarray | None, ridge: float) -> np.ndarray:
    S = stats.steps
    w = site_weights(stats) if sites is None else np.asarray(sites, dtype=np.float64)
    K, J, I = np.meshgrid(np.arange(S + 1), np.arange(S), np.arange(S), indexing="ij")
    valid = (J < I) & ((K < J) | (K == S))
    k, j, i = K[valid], J[valid], I[valid]  # a sixth of the table: fitted alone
    flat = np.zeros(k.shape)
    for s in range(stats.gram.shape[0]):  # one site at a time: block granularity has many
        flat += w[s] * _site_fits(stats, s, k, j, i, ridge)[2]
    err = np.zeros(K.shape)
    err[valid] = flat
    return err


def _cached_steps(full_steps: list[int], steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, J, I): every cached step i of the plan with its last two full steps (k = steps where only one)."""
    full = sorted(set(full_steps))
    ks, js, cached = [], [], []
    for i in range(steps):
        before = [f for f in full if f < i]
        if i not in full:
            cached.append(i)
            js.append(before[-1])
            ks.append(before[-2] if len(before) > 1 else steps)
    return np.array(ks, dtype=int), np.array(js, dtype=int), np.array(cached, dtype=int)


def forecast_weights(stats: PlanStats, full_steps: list[int], steps: int,
                     ridge: float = RIDGE) -> dict[int, ForecastWeights]:
    """Per cached step i of the plan, the weights of the plan's last two full steps before i (b = d = 0 after
    the first full step only): (a, b) of the principal part, per component where the statistics allow
    ([2, sites, k]) else one per site ([2, sites, 1]), and (c, d) of the residual ([2, sites])."""
    if steps != stats.steps:
        raise ValueError(f"fitted weights exist for {stats.steps} steps, not {steps}")
    K, J, I = _cached_steps(full_steps, steps)
    if not len(I):
        return {}
    fits = [_site_fits(stats, s, K, J, I, ridge) for s in range(stats.gram.shape[0])]
    p = np.stack([np.stack(f[0]) for f in fits], 1)  # [2, sites, k, cached]
    r = np.stack([np.stack(f[1]) for f in fits], 1)  # [2, sites, cached]
    return {int(i): (p[..., n], r[..., n]) for n, i in enumerate(I)}


def taylor_forecast_weights(full_steps: list[int], steps: int, sites: int) -> dict[int, ForecastWeights]:
    """Taylor order 1 on both parts in the layout of `forecast_weights` (a = c = 1 + m, b = d = -m): the stated rule
    for a step count the weights were not fitted at."""
    K, J, I = _cached_steps(full_steps, steps)
    m = np.where(K < steps, (I - J) / np.maximum(J - np.where(K < steps, K, 0), 1), 0.0)
    rows = np.stack([1 + m, -m])  # [2, cached]
    return {int(i): (np.repeat(rows[:, None, None, n], sites, axis=1), np.repeat(rows[:, None, n], sites, axis=1))
            for n, i in enumerate(I)}
