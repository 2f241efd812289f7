"""The threshold sweep of `svdexport compare`: a peer that decides per step against a threshold
(FirstBlockCache, MagCache, cache-dit's dynamic DBCache) is matched to a budget of full steps by searching
its threshold on inputs that are never measured."""

from __future__ import annotations

import math
from typing import Callable

SWEEP_SEEDS = (90_000, 90_001)  # inputs of the threshold sweeps: never among the measured samples
SWEEP_EXPAND, SWEEP_BISECT = 8, 6  # threshold doublings/halvings to bracket the budget, then bisections


def sweep_threshold(full_steps: Callable[[float], float], budget: int, start: float,
                    expand: int = SWEEP_EXPAND, bisect: int = SWEEP_BISECT) -> float:
    """The threshold whose full steps come nearest `budget` (ties: the larger threshold, less compute).

    Full steps fall as the threshold rises (more steps served from the cache). Doubles or halves from `start`
    until the budget is bracketed, then bisects geometrically; stops at an exact hit.
    """
    tried: dict[float, float] = {}

    def f(t: float) -> float:
        if t not in tried:
            tried[t] = full_steps(t)
        return tried[t]

    lo = hi = None  # lo: full steps >= budget (too many); hi: <= budget
    t = start
    for _ in range(expand):
        v = f(t)
        if v == budget:
            break
        if v > budget:
            lo = t
            if hi is not None:
                break
            t *= 2
        else:
            hi = t
            if lo is not None:
                break
            t /= 2
    if lo is not None and hi is not None and f(lo) != budget and f(hi) != budget:
        for _ in range(bisect):
            mid = math.sqrt(lo * hi)
            v = f(mid)
            if v == budget:
                break
            lo, hi = (mid, hi) if v > budget else (lo, mid)
    return min(tried, key=lambda t: (abs(tried[t] - budget), -t))
