"""Calibration: full-compute sampling on reference inputs, then the bases from the accumulated Gram, and
the step plan from the cross-step inner products of the same trajectories (a second pass, with the bases)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from svdexport.cache.plan import StepPlan
from svdexport.cache.plan_stats import PlanAccumulator, PlanStats
from svdexport.cache.config import CacheConfig
from svdexport.cache.svd import Bases, GramAccumulator, reconstruct
from svdexport.models.family import Sampling, Shapes
from svdexport.runtime.scheduler import CachedSampler, Graph

# Seeds of the calibration inputs start here, away from the small seeds users pass to `run`.
CALIBRATION_SEED = 1_000_000


@dataclass
class CalibrationSettings:
    num_inputs: int  # reference generations
    steps: int  # sampling steps of each
    tau: float  # energy the principal subspace keeps
    k_max: int  # rank cap per site


def calibrate(full: Graph, cached: Graph, sampling: Sampling, shapes: Shapes, sites: list[str], dim: int,
              make_inputs: Callable[[int], dict[str, torch.Tensor]], settings: CalibrationSettings,
              progress: bool = True, shapes_of: Callable[[int], Shapes] | None = None) -> Bases:
    """Bases for `sites` from `settings.num_inputs` full-compute generations of `settings.steps` steps.

    The full graph runs with all-zero bases, so its residual output is the site features themselves.
    `shapes_of(seed)`: the shapes of that input, when they are not all `shapes` (--calib-shapes); the Gram
    sums over every token, so each input weighs by its token count.
    """
    zero = torch.zeros(len(sites), dim, 1)
    steps = settings.steps
    every_step = CacheConfig(warmup=steps, interval=1)
    loop = CachedSampler(full, cached, zero, every_step, sampling, shapes)
    acc = GramAccumulator(len(sites), dim)
    with tqdm(total=settings.num_inputs * steps, desc="calibrating", unit="step", disable=not progress) as bar:
        for i in range(settings.num_inputs):
            def on_full_step(step: int, coeffs: torch.Tensor, features: torch.Tensor) -> None:
                acc.add(features)
                bar.update()

            seed = CALIBRATION_SEED + i
            loop.generate(make_inputs(seed), steps, on_full_step=on_full_step,
                          shapes=shapes_of(seed) if shapes_of else None)
    return Bases.from_gram(acc, sites, settings.tau, settings.k_max, settings.num_inputs)


# Above this many numbers per site and batch row (tokens x hidden), trajectories are count-sketched to
# SKETCH buckets: 2 x steps x SKETCH floats per site instead of the features (20 GB at FLUX.1's size).
EXACT_LIMIT, SKETCH = 1 << 17, 1 << 14


def plan_statistics(full: Graph, cached: Graph, sampling: Sampling, shapes: Shapes, bases: torch.Tensor,
                    make_inputs: Callable[[int], dict[str, torch.Tensor]], settings: CalibrationSettings,
                    progress: bool = True) -> PlanStats:
    """Inner products of the site features across the steps of the calibration trajectories (the same
    seeds as the bases), split with the bases: what the plan search needs, O(sites x steps^2) numbers."""
    steps = settings.steps
    loop = CachedSampler(full, cached, bases, CacheConfig(warmup=steps, interval=1), sampling, shapes)
    acc: PlanAccumulator | None = None
    with tqdm(total=settings.num_inputs * steps, desc=f"planning ({steps} steps)", unit="step",
              disable=not progress) as bar:
        for i in range(settings.num_inputs):
            def on_full_step(step: int, coeffs: torch.Tensor, residuals: torch.Tensor) -> None:
                nonlocal acc
                features = reconstruct(coeffs, residuals, bases.to(coeffs))
                if acc is None:
                    size = features.shape[2] * features.shape[3]
                    acc = PlanAccumulator(steps, bases, sketch=None if size <= EXACT_LIMIT else SKETCH)
                acc.add(step, features)
                bar.update()

            loop.generate(make_inputs(CALIBRATION_SEED + i), steps, on_full_step=on_full_step)
    return acc.stats()


def batch_inputs(inputs: list[dict[str, torch.Tensor]], batched: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Several samples' inputs as one batch: the `batched` keys joined on their leading axis, the rest
    (position tables, ids) taken from the first sample."""
    out = dict(inputs[0])
    for k in batched:
        if k in out and out[k] is not None and out[k].dim() > 0:
            out[k] = torch.cat([x[k] for x in inputs])
    return out


def latent_psnr(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per batch row of x against reference, the peak being each reference row's range."""
    x, reference = x.double().flatten(1), reference.double().flatten(1)
    mse = (x - reference).pow(2).mean(1).clamp_min(1e-30)
    peak = reference.max(1).values - reference.min(1).values
    return 10 * torch.log10(peak * peak / mse)


def closed_loop_score(full: Graph, cached: Graph, sampling: Sampling, shapes: Shapes, bases: torch.Tensor,
                      cache: CacheConfig, inputs: dict[str, torch.Tensor], steps: int,
                      fitted: Callable[[list[int]], dict] | None = None) -> Callable[[list[int]], float]:
    """score(plan): the mean PSNR of the final latents of cached sampling with `plan` (and `cache`'s
    forecast; `fitted(plan)` gives a fitted predictor's weights) against full compute, over the batch rows
    of `inputs`. What the closed-loop plan refinement (`plan.refine`) maximises: the error that reaches the
    sample, after the output head and the sampler."""
    loop = CachedSampler(full, cached, bases, cache, sampling, shapes)
    reference = loop.generate(inputs, steps, plan=StepPlan(list(range(steps)), steps, "every step")).latents

    def score(full_steps: list[int]) -> float:
        plan = StepPlan(full_steps, steps, "refining", None if fitted is None else fitted(full_steps))
        latents = loop.generate(inputs, steps, plan=plan).latents
        return float(latent_psnr(latents, reference).clamp_max(99.0).mean())

    return score
