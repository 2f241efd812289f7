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
"""

from __future__ import annotations

import numpy as np

from svdexport.cache.plan import PlanStats, site_weights

# Ridge toward Taylor's weights, relative to the Gram diagonal: only guards a singular fit (F_j = F_k).
RIDGE = 1e-6


def _parts(stats: PlanStats) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrices [sites, S, S] of the principal part P F and of the residual (I - P) F."""
    if "parts" not in stats.derived:
        cross = stats.cross  # <F_p, P F_q>
        stats.derived["parts"] = stats.proj, stats.gram - cross - cross.transpose(0, 2, 1) + stats.proj
    return stats.derived["parts"]


def _fit(M: np.ndarray, K: np.ndarray, J: np.ndarray, I: np.ndarray, ridge: float):
    """Least-squares (a, b) and squared error of M's vectors: F_I ~ a F_J + b F_K per site, for index arrays
    of one shape; K = S means no earlier full step (b = 0). M [sites, S, S] -> arrays [sites, *shape]."""
    S = M.shape[-1]
    two = K < S
    Kc = np.where(two, K, J)
    m = np.where(two, (I - J) / np.maximum(J - Kc, 1), 0.0)
    jj, kk, jk, ij, ik, ii = (M[:, p, q] for p, q in ((J, J), (Kc, Kc), (J, Kc), (I, J), (I, Kc), (I, I)))
    reg = ridge * 0.5 * (jj + kk)
    a11, a22, r1, r2 = jj + reg, kk + reg, ij + reg * (1 + m), ik - reg * m
    det = a11 * a22 - jk * jk
    det = np.where(np.abs(det) > 0, det, 1.0)
    a = np.where(two, (a22 * r1 - jk * r2) / det, ij / np.where(jj > 0, jj, 1.0))
    b = np.where(two, (a11 * r2 - jk * r1) / det, 0.0)
    err = ii - 2 * (a * ij + b * ik) + a * a * jj + 2 * a * b * jk + b * b * kk
    return a, b, np.maximum(err, 0.0)


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
    err = np.zeros(K.shape)
    for M in _parts(stats):
        for s in range(M.shape[0]):  # one site at a time: block granularity has many
            err += w[s] * _fit(M[s : s + 1], K, J, I, ridge)[2][0]
    return np.where(valid, err, 0.0)


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


def weights(stats: PlanStats, full_steps: list[int], steps: int, ridge: float = RIDGE) -> dict[int, np.ndarray]:
    """Per cached step i of the plan: [4, sites] float64, rows (a, b) of the principal part and (c, d) of
    the residual, for the plan's last two full steps before i (b = d = 0 after the first full step only)."""
    if steps != stats.steps:
        raise ValueError(f"fitted weights exist for {stats.steps} steps, not {steps}")
    K, J, I = _cached_steps(full_steps, steps)
    if not len(I):
        return {}
    rows = []
    for M in _parts(stats):
        a, b, _ = _fit(M, K, J, I, ridge)
        rows += [a, b]
    table = np.stack(rows)  # [4, sites, cached]
    return {int(i): table[:, :, n] for n, i in enumerate(I)}


def taylor_weights(full_steps: list[int], steps: int, sites: int) -> dict[int, np.ndarray]:
    """Taylor order 1 on both parts in the layout of `weights` (a = c = 1 + m, b = d = -m): the stated rule
    for a step count the weights were not fitted at."""
    K, J, I = _cached_steps(full_steps, steps)
    m = np.where(K < steps, (I - J) / np.maximum(J - np.where(K < steps, K, 0), 1), 0.0)
    rows = np.stack([1 + m, -m, 1 + m, -m])  # [4, cached]
    return {int(i): np.repeat(rows[:, n : n + 1], sites, axis=1) for n, i in enumerate(I)}
