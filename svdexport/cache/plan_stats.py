"""Plan statistics: inner products of the cache sites' features across the steps of the calibration
trajectories (`PlanStats`), summed online while they run (`PlanAccumulator`), and their file in an engine
folder, one set per step count. The plan search (cache/plan.py) and the fitted forecast (cache/fitted.py)
need nothing else of the trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from svdexport.errors import SvdExportError
from svdexport.files import save_tensors


@dataclass
class PlanStats:
    """Cross-step inner products per site, summed over calibration trajectories and batch rows."""

    gram: np.ndarray  # [sites, S, S] <s_p, s_q>
    cross: np.ndarray  # [sites, S, S] <s_p, t_q>
    proj: np.ndarray  # [sites, S, S] <t_p, t_q>
    trajectories: int  # batch rows seen at step 0
    # [sites, k, S, S] <c_p, c_q> per principal coefficient c = V^T s (the fitted forecast's weight per
    # component, cache/fitted.py); None where the accumulator sketched, or in files written before it.
    comp: np.ndarray | None = None
    # Tables derived from the above, kept so that repeated plan searches compute them once (cache/fitted.py).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def steps(self) -> int:
        return self.gram.shape[-1]


class PlanAccumulator:
    """Fed one step's stacked site features [sites, B, N, D] at a time, steps 0..S-1 in order per trajectory.

    Only the current trajectory is held: exactly when `sketch` is None (2 x S x B x N x D float64 per site,
    fine for small models), or as a count sketch of `sketch` buckets per batch row (2 x S x B x sketch per
    site: FLUX-sized features on a GPU). A sketch keeps each forecast error's norm to about sqrt(2 / sketch)
    relative: errors are linear combinations of sketched vectors, so no large Gram entries cancel.
    """

    def __init__(self, steps: int, bases: torch.Tensor, sketch: int | None = None, seed: int = 0):
        self.steps, self.sketch, self.seed = steps, sketch, seed
        self.bases = bases.detach().double()  # [sites, D, k]; zero columns are harmless
        sites = bases.shape[0]
        self.gram, self.cross, self.proj = (torch.zeros(sites, steps, steps, dtype=torch.float64) for _ in range(3))
        # Per-component Grams of the coefficients, exact only (they are N x k per row, but FLUX-sized sketches
        # run where memory is short): [sites, k, S, S], and the current trajectory's [sites, S, B, N, k].
        self.comp = None if sketch is not None else torch.zeros(sites, bases.shape[-1], steps, steps,
                                                                dtype=torch.float64)
        self.cbuf: torch.Tensor | None = None
        self.trajectories = 0
        self.buckets: torch.Tensor | None = None  # sketch hash per coordinate, made at the first add
        self.signs: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None  # [2, sites, S, B, L]: embeddings of s and t, current trajectory
        self.next = 0  # the step expected next

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[sites, B, N, D] -> [sites, B, L] (L = N*D exact, else the sketch size)."""
        flat = x.flatten(2)
        if self.sketch is None:
            return flat
        if self.buckets is None:
            g = torch.Generator().manual_seed(self.seed)
            n = flat.shape[-1]
            self.buckets = torch.randint(self.sketch, (n,), generator=g).to(flat.device)
            self.signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(flat.device, flat.dtype)
        out = flat.new_zeros(*flat.shape[:2], self.sketch)
        return out.index_add_(2, self.buckets, flat * self.signs)

    @torch.no_grad()
    def add(self, step: int, features: torch.Tensor) -> None:
        if step != (0 if step == 0 else self.next):
            raise ValueError(f"steps must arrive in order 0..{self.steps - 1}; got {step} after {self.next - 1}")
        f = features.detach().double()
        v = self.bases.to(f.device).unsqueeze(1)  # [sites, 1, D, k]
        c = f @ v  # [sites, B, N, k]
        sq, tq = self._embed(f), self._embed(c @ v.transpose(-1, -2))
        if step == 0:
            self.trajectories += f.shape[1]
            if self.buf is None or self.buf.shape[-2:] != sq.shape[-2:]:  # preallocated: no copies per step
                self.buf = sq.new_empty(2, sq.shape[0], self.steps, *sq.shape[1:])
            if self.comp is not None and (self.cbuf is None or self.cbuf.shape[2:] != c.shape[1:]):
                self.cbuf = c.new_empty(c.shape[0], self.steps, *c.shape[1:])
        self.buf[0, :, step], self.buf[1, :, step] = sq, tq
        if self.comp is not None:
            self.cbuf[:, step] = c
            col = torch.einsum("spbnk,sbnk->skp", self.cbuf[:, : step + 1], c).cpu()
            self.comp[:, :, : step + 1, step] += col
            self.comp[:, :, step, :step] += col[..., :step]
        s_all, t_all = self.buf[0, :, : step + 1], self.buf[1, :, : step + 1]
        self.next = step + 1
        # Row and column `step` against every earlier step of this trajectory, summed over batch rows.
        g = torch.einsum("spbl,sbl->sp", s_all, sq).cpu()
        x_pq = torch.einsum("spbl,sbl->sp", s_all, tq).cpu()  # <s_p, t_q>
        x_qp = torch.einsum("sbl,spbl->sp", sq, t_all).cpu()  # <s_q, t_p>
        h = torch.einsum("spbl,sbl->sp", t_all, tq).cpu()
        q = step
        for m, col, row in ((self.gram, g, g), (self.cross, x_pq, x_qp), (self.proj, h, h)):
            m[:, : q + 1, q] += col
            m[:, q, :q] += row[:, :q]

    def stats(self) -> PlanStats:
        return PlanStats(self.gram.numpy().copy(), self.cross.numpy().copy(), self.proj.numpy().copy(),
                         self.trajectories, None if self.comp is None else self.comp.numpy().copy())


STATS_FORMAT = "svdexport.plan_stats/1"
STATS_ARRAYS = ("gram", "cross", "proj", "comp")


def save_stats(stats: PlanStats | list[PlanStats], path) -> None:
    """Plan statistics as safetensors (float64), so an engine can plan other budgets at run time: one set per
    step count (`build --plan-steps`), the build's own first under plain names, each other one's arrays
    suffixed "@steps" (files written before there were several hold the first set alone)."""
    sets = [stats] if isinstance(stats, PlanStats) else list(stats)
    tensors, meta = {}, {"format": STATS_FORMAT}
    for i, st in enumerate(sets):
        tag = "" if i == 0 else f"@{st.steps}"
        tensors.update({k + tag: torch.from_numpy(getattr(st, k)).contiguous()
                        for k in STATS_ARRAYS if getattr(st, k) is not None})
        meta["trajectories" + tag] = str(st.trajectories)
    meta["also_steps"] = ",".join(str(st.steps) for st in sets[1:])
    save_tensors(tensors, path, meta)


def load_stats(path) -> list[PlanStats]:
    """Every set of plan statistics in the file, the build's own step count first."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            if meta.get("format") != STATS_FORMAT:
                raise ValueError("not an svdexport plan statistics file")
            sets = []
            for tag in [""] + [f"@{n}" for n in filter(None, meta.get("also_steps", "").split(","))]:
                arrays = {k: f.get_tensor(k + tag).numpy() for k in STATS_ARRAYS if k + tag in keys}
                sets.append(PlanStats(arrays["gram"], arrays["cross"], arrays["proj"],
                                      int(meta["trajectories" + tag]), arrays.get("comp")))
        return sets
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise SvdExportError(f"cannot read plan statistics {path}: {e}") from None
